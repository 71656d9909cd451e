"""Width export: a smaller dense checkpoint whose projections are sliced to the kept heads and channels.

Standard configs (Llama, Mistral, Qwen2, ...) have one ``num_attention_heads``, ``num_key_value_heads`` and
``intermediate_size`` for all layers, and no per-layer widths. So:

* a profile with the same width in every attention and every MLP (and nothing removed) becomes a plain
  checkpoint with those three numbers changed (``head_dim`` written explicitly): ``from_pretrained``,
  vLLM and llama.cpp's converter read it as any model of that shape;
* any other profile is written with its per-layer shapes and the widths under ``evopress_width`` in
  config.json, and read back by ``evopress.load_compressed`` (``load``): the model is built without
  weights from the config, each projection (and removed sub-block) reshaped as recorded, then the
  checkpoint assigned. transformers' attention derives its head counts from the projections' shapes,
  so the sliced modules run unchanged.

The export computes exactly what the search scored: the output projections hold the database's stored
values, the input projections the dense rows of the kept structures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import UserError
from ...io import write_json
from ...models import Decoder
from ..drop.space import DroppedAttention, DroppedMLP
from ..problem import Config
from .space import WidthSpace
from .structures import Unit, find_units, sub_block_attr

WIDTH = "evopress_width"  # config.json: {"attention": [kv groups per block], "mlp": [channels per block], ...}
PROFILE = "evopress_profile.json"


def _sliced(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    new.weight.data = weight.contiguous()
    if bias is not None:
        new.bias.data = bias.contiguous()
    return new.requires_grad_(False)


def _remove(decoder: Decoder, unit: Unit) -> None:
    """Put a module that computes nothing where the unit's sub-block was (width 0)."""
    setattr(decoder.layers[unit.block], sub_block_attr(decoder, unit.kind),
            DroppedAttention() if unit.kind == "attention" else DroppedMLP())


def _replace(decoder: Decoder, unit: Unit, role: str, layer: nn.Module) -> None:
    setattr(getattr(decoder.layers[unit.block], sub_block_attr(decoder, unit.kind)), role, layer)


def thin(space: WidthSpace, config: Config) -> None:
    """Slice the (dense) model's projections to ``config`` in place."""
    space.apply(None)
    decoder = space.decoder
    for u, (unit, level) in enumerate(zip(space.wunits, config)):
        width = unit.widths[level]
        if width == unit.structures:
            continue
        if width == 0:
            _remove(decoder, unit)
            continue
        kept = torch.tensor(space.kept(u, width))
        for role, layer in unit.inputs.items():
            rows = unit.row_index(role, kept).to(layer.weight.device)
            _replace(decoder, unit, role, _sliced(layer.weight.data[rows],
                                                  None if layer.bias is None else layer.bias.data[rows]))
        out = unit.output
        weight = space.thinned(u, level).to(out.weight.device)
        _replace(decoder, unit, unit.name.rsplit(".", 1)[-1], _sliced(weight, out.bias))


def uniform_shape(space: WidthSpace, config: Config) -> tuple[int, int] | None:
    """(kv groups, channels) when every attention and every MLP keeps the same non-zero width, else None."""
    widths = space.widths(config)
    kinds = {kind: {w for u, w in zip(space.wunits, widths) if u.kind == kind} for kind in ("attention", "mlp")}
    if any(len(ws) != 1 or 0 in ws for ws in kinds.values()):
        return None
    return next(iter(kinds["attention"])), next(iter(kinds["mlp"]))


def export(space: WidthSpace, config: Config, out: Path, tokenizer: Any) -> dict[str, Any]:
    """The checkpoint described in the module doc; modifies the model in place."""
    widths = space.widths(config)
    attention = [w for u, w in zip(space.wunits, widths) if u.kind == "attention"]
    mlp = [w for u, w in zip(space.wunits, widths) if u.kind == "mlp"]
    first = space.wunits[0]
    heads_per_group, head_dim = first.size // first.rows["k_proj"], first.rows["k_proj"]
    shape = uniform_shape(space, config)
    thin(space, config)
    model, cfg = space.decoder.model, space.decoder.text_config
    if shape is not None:
        cfg.head_dim = head_dim
        cfg.num_key_value_heads, cfg.num_attention_heads = shape[0], shape[0] * heads_per_group
        cfg.intermediate_size = shape[1]
    else:
        setattr(cfg, WIDTH, {"attention": attention, "mlp": mlp, "heads_per_group": heads_per_group,
                             "head_dim": head_dim})
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    report = space.budget_report(config)
    write_json(out / PROFILE, {"space": space.name, "target": space.target, "achieved": report["achieved"],
                               "kv_groups_kept": attention, "mlp_channels_kept": mlp,
                               "heads_per_group": heads_per_group, "head_dim": head_dim,
                               "plain_checkpoint": shape is not None})
    return {"out": str(out), "plain_checkpoint": shape is not None, "achieved": round(report["achieved"], 4),
            "parameters": sum(p.numel() for p in model.parameters())}


def load(path: Path, config: dict[str, Any], dtype: torch.dtype) -> nn.Module | None:
    """A non-uniform width export (``SpacePlugin.load``); None for any other checkpoint."""
    spec = config.get(WIDTH) or (config.get("text_config") or {}).get(WIDTH)
    if not spec:
        return None
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():  # parameters on the meta device; buffers (RoPE) real
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path, local_files_only=True), dtype=dtype)
    decoder = Decoder(model)
    units = find_units(decoder, 32)  # the projections and their structures; the step does not matter here
    attention, mlp = spec["attention"], spec["mlp"]
    if len(attention) != decoder.num_blocks or len(mlp) != decoder.num_blocks:
        raise UserError(f"{path}/config.json: {WIDTH} gives {len(attention)}/{len(mlp)} widths for "
                        f"{decoder.num_blocks} blocks")
    for unit in units:
        width = (attention if unit.kind == "attention" else mlp)[unit.block]
        if width == 0:
            _remove(decoder, unit)
            continue
        for role, layer in unit.inputs.items():
            _replace(decoder, unit, role, nn.Linear(layer.in_features, width * unit.rows[role],
                                                    bias=layer.bias is not None, device="meta"))
        out = unit.output
        _replace(decoder, unit, unit.name.rsplit(".", 1)[-1],
                 nn.Linear(width * unit.size, out.out_features, bias=out.bias is not None, device="meta"))
    state: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    if unexpected or set(missing) - tied - {"lm_head.weight"}:
        raise UserError(f"{path}: the checkpoint does not match its {WIDTH} shapes (missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]})")
    if "lm_head.weight" in missing:
        model.tie_weights()
    return model.eval().requires_grad_(False)
