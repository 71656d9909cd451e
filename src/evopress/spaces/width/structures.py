"""What the width space can thin in each block, found on the model: heads of attention, channels of MLPs.

One unit per attention sub-block and one per MLP, each named by its output projection (``o_proj``,
``down_proj``): that is the one weight a level changes during the search (its removed input columns
zeroed, the rest updated by OBS), so every other projection stays as loaded.

Attention levels count kept KV groups: a group is one key/value head with the query heads that share it
(``num_attention_heads / num_key_value_heads``; one query head per group without GQA). Why whole groups:
transformers' attention derives a layer's head counts from its projections' shapes but keeps one
``num_key_value_groups`` per layer, so thinning query heads inside a group would need per-layer GQA ratios
no standard config has. MLP levels count kept intermediate channels in steps of ``step`` (a multiple of
32, so the result stays kernel-friendly); the last level is the full width, whatever its remainder.
Level 0 removes the sub-block (its output projection adds nothing), so the depth space's configurations
are the width space's with every unit at 0 or full. A sub-block whose output projection has a bias keeps
it at every width, so for it level 0 is not offered (a removed sub-block would drop the bias too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...database import block_linears
from ...errors import UserError
from ...models import Decoder

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Unit:
    """One thinnable sub-block: its projections by role, its structures and the widths its levels keep."""

    block: int
    kind: str  # "attention" or "mlp"
    name: str  # full module name of the output projection
    inputs: dict[str, nn.Linear]  # the projections whose output rows a structure owns
    output: nn.Linear  # the projection whose input columns a structure owns
    size: int  # input columns of the output projection per structure (heads per group x head_dim, or 1)
    rows: dict[str, int]  # rows of each input projection per structure
    widths: tuple[int, ...]  # kept structures at each level, ascending; the last is all of them

    @property
    def structures(self) -> int:
        return self.widths[-1]

    def params(self, width: int) -> int:
        """Parameters (weights and biases) of the sub-block's linear layers at ``width`` structures."""
        out = self.output
        total = out.out_features * width * self.size + (out.bias.numel() if out.bias is not None else 0)
        for role, layer in self.inputs.items():
            kept = width * self.rows[role]
            total += kept * layer.in_features + (kept if layer.bias is not None else 0)
        return total if width or out.bias is not None else 0

    def row_index(self, role: str, kept: torch.Tensor) -> torch.Tensor:
        """Rows of input projection ``role`` owned by the structures ``kept`` (ascending)."""
        r = self.rows[role]
        return (kept[:, None] * r + torch.arange(r)[None, :]).reshape(-1)



def sub_block_attr(decoder: Decoder, kind: str) -> str:
    """The block's attribute holding the ``kind`` ("attention" or "mlp") sub-block."""
    return decoder.attn_attr if kind == "attention" else decoder.mlp_attr


def _projections(decoder: Decoder, b: int, roles: tuple[str, ...], kind: str) -> dict[str, tuple[str, nn.Linear]]:
    """Block ``b``'s ``roles`` projections of its ``kind`` sub-block: role -> (full module name, module)."""
    sub = sub_block_attr(decoder, kind)
    linears = {n.rsplit(".", 1)[-1]: (n, m) for n, m in block_linears(decoder, b).items() if n.split(".")[-2] == sub}
    missing = [r for r in roles if r not in linears]
    if missing:
        raise UserError(f"the width space needs separate {', '.join(roles)} projections in every {kind} "
                        f"sub-block; block {b} lacks {', '.join(missing)} (fused projections, e.g. Phi-3's "
                        "qkv_proj, are not supported)")
    return {r: linears[r] for r in roles}


def default_step(decoder: Decoder) -> int:
    """MLP channels per level: a multiple of 64 giving about 24 levels (64 on small models, 448 on 7B's 11,008)."""
    intermediate = _projections(decoder, 0, MLP, "mlp")["down_proj"][1].in_features
    return 64 * max(1, round(intermediate / 64 / 24))


def find_units(decoder: Decoder, step: int) -> list[Unit]:
    """Every block's attention and MLP units, in block order (attention first); ``step``: MLP channels per
    level."""
    if step < 32 or step % 32:
        raise UserError(f"--mlp-step {step}: MLP channels per level must be a positive multiple of 32")
    units = []
    for b in range(decoder.num_blocks):
        found = _projections(decoder, b, ATTENTION, "attention")
        attn = {role: m for role, (_, m) in found.items()}
        module = decoder.attn(b)
        head_dim = getattr(module, "head_dim", None)
        if head_dim is None:
            raise UserError(f"the width space needs the attention's head_dim ({type(module).__name__} has none)")
        heads, kv = attn["q_proj"].out_features // head_dim, attn["k_proj"].out_features // head_dim
        if heads % kv:
            raise UserError(f"block {b}: {heads} query heads do not split into {kv} key/value groups")
        per_group = heads // kv
        units.append(Unit(b, "attention", found["o_proj"][0], {k: attn[k] for k in ATTENTION[:3]}, attn["o_proj"],
                          per_group * head_dim, {"q_proj": per_group * head_dim, "k_proj": head_dim,
                                                 "v_proj": head_dim}, _widths(kv, 1, attn["o_proj"])))
        found = _projections(decoder, b, MLP, "mlp")
        mlp = {role: m for role, (_, m) in found.items()}
        inter = mlp["down_proj"].in_features
        units.append(Unit(b, "mlp", found["down_proj"][0], {"gate_proj": mlp["gate_proj"], "up_proj": mlp["up_proj"]},
                          mlp["down_proj"], 1, {"gate_proj": 1, "up_proj": 1}, _widths(inter, step, mlp["down_proj"])))
    return units


def _widths(structures: int, step: int, output: nn.Linear) -> tuple[int, ...]:
    """0 (the sub-block removed, unless its output has a bias), then every ``step``, then the full width."""
    widths = list(range(step, structures, step)) + [structures]
    return tuple(([0] if output.bias is None else []) + widths)
