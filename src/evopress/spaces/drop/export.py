"""Depth export: a plain transformers checkpoint that computes exactly the searched configuration.

Whole dropped blocks are removed (``num_hidden_layers`` shrinks, per-layer attention types follow),
which transformers rebuilds natively. A lone dropped attention or MLP sub-block has no standard
expression in Llama/Mistral/Qwen/Phi/Gemma configs (transformers 5.24 has no per-layer "no-op"
field, and no DeciLM / Nemotron-NAS class: those load only with ``trust_remote_code`` from the
Hub). So its output projection is zeroed: plain ``from_pretrained`` then computes the exact
configuration, at dense cost for that sub-block. config.json records the dropped sub-blocks as
``evopress_dropped: {"attention": [...], "mlp": [...]}`` (indices of the exported blocks);
``evopress.load_compressed`` replaces them with modules that compute nothing (the sub-block's
pre-norm and residual add remain), which is where the speed comes from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import UserError
from ...io import write_json
from ...models import Decoder
from ..problem import Config
from .space import DropSpace, DroppedAttention, DroppedMLP

DROPPED = "evopress_dropped"  # config.json key: {"attention": [block, ...], "mlp": [block, ...]}


def _output_projection(module: nn.Module) -> nn.Linear:
    """The linear layer that writes a sub-block's result (o_proj, down_proj, ...): the last one registered."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"cannot export: {type(module).__name__} has no linear output projection")
    return linears[-1]


def _shrink_config(config: Any, keep: list[int], blocks: int) -> None:
    """Keep only the ``keep`` blocks in the config that describes the block stack (a multimodal model's
    text_config, edited in place inside the model's config), per-layer attention types included.

    Why the check: writing the count anywhere else would reload the removed blocks freshly initialised.
    """
    if getattr(config, "num_hidden_layers", None) != blocks:
        raise UserError(f"cannot export: the model config does not give its {blocks} decoder blocks as "
                        "num_hidden_layers, so removed blocks cannot be written out")
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[b] for b in keep]
    config.num_hidden_layers = len(keep)


def remove_blocks(space: DropSpace, masks: list[tuple[bool, bool]]) -> tuple[list[int], dict[str, list[int]]]:
    """Make the (dense) model compute the sub-block ``masks`` with standard modules, as the module doc says.

    Returns the kept blocks and the dropped sub-blocks by index among them.
    """
    keep = [b for b, (attn, mlp) in enumerate(masks) if not (attn and mlp)]
    _shrink_config(space.decoder.text_config, keep, space.num_blocks)  # first: it may refuse
    kept = [masks[b] for b in keep]
    dropped = {"attention": [i for i, (a, _) in enumerate(kept) if a], "mlp": [i for i, (_, m) in enumerate(kept) if m]}
    for b in keep:
        for gone, module in ((masks[b][0], space.decoder.attn(b)), (masks[b][1], space.decoder.mlp(b))):
            if gone:
                proj = _output_projection(module)
                proj.weight.data.zero_()
                if proj.bias is not None:
                    proj.bias.data.zero_()
    layers = space.decoder.layers
    for b in reversed(range(space.num_blocks)):
        if b not in keep:
            del layers[b]  # ModuleList renumbers what follows
    for i, layer in enumerate(layers):
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = i
    return keep, dropped


def export(space: DropSpace, config: Config, out: Path, tokenizer: Any) -> dict[str, Any]:
    """The checkpoint described in the module doc; modifies the model in place."""
    space.apply(None)
    keep, dropped = remove_blocks(space, space.masks(config))
    model = space.decoder.model
    setattr(model.config, DROPPED, dropped)  # load_compressed makes them compute nothing
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    profile = {
        "space": space.name, "target": space.target,
        "removed_blocks": [b for b in range(space.num_blocks) if b not in keep],
        DROPPED: dropped, "original_num_hidden_layers": space.num_blocks,
    }
    write_json(out / "evopress_profile.json", profile)
    return {"out": str(out), "num_hidden_layers": len(keep), DROPPED: dropped,
            "parameters": sum(p.numel() for p in model.parameters())}


def load(path: Path, config: dict[str, Any], dtype: torch.dtype) -> nn.Module | None:
    """A depth export with its dropped sub-blocks computing nothing (``SpacePlugin.load``); None without any."""
    dropped = config.get(DROPPED)
    if not dropped or not (dropped.get("attention") or dropped.get("mlp")):
        return None
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    decoder = Decoder(model)
    for kind, attr, module in (("attention", decoder.attn_attr, DroppedAttention),
                               ("mlp", decoder.mlp_attr, DroppedMLP)):
        for b in dropped.get(kind, []):
            if not 0 <= b < decoder.num_blocks:
                raise UserError(f"{path}/config.json: {DROPPED} names block {b} of {decoder.num_blocks}")
            setattr(decoder.layers[b], attr, module())
    return model.eval().requires_grad_(False)
