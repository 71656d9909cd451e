"""Depth export: a plain transformers checkpoint that computes exactly the searched configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ...errors import UserError
from ...io import write_json
from ..base import Config
from .space import DropSpace


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


def remove_blocks(space: DropSpace, masks: list[tuple[bool, bool]]) -> list[int]:
    """Make the (dense) model compute the sub-block ``masks`` with standard modules; returns the kept blocks.

    Whole dropped blocks are removed (``num_hidden_layers`` shrinks, so the model is smaller and
    faster). A lone dropped sub-block cannot be expressed in a standard architecture, so its output
    projection (attention ``o_proj``-like last linear, MLP ``down_proj``-like last linear) is zeroed:
    the sub-block then adds exactly zero to the residual stream, with identical logits.
    """
    keep = [b for b, (attn, mlp) in enumerate(masks) if not (attn and mlp)]
    _shrink_config(space.decoder.text_config, keep, space.num_blocks)  # first: it may refuse
    for b, (attn, mlp) in enumerate(masks):
        for dropped, module in ((attn, space.decoder.attn(b)), (mlp, space.decoder.mlp(b))):
            if dropped and not (attn and mlp):
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
    return keep


def block_configs(masks: list[tuple[bool, bool]]) -> list[dict[str, Any]]:
    """DeciLM/Nemotron-NAS style ``block_configs`` (no-op attention/FFN) of the kept blocks."""
    return [{"attention": {"no_op": a}, "ffn": {"no_op": m}} for a, m in masks if not (a and m)]


def export(space: DropSpace, config: Config, out: Path, tokenizer: Any) -> dict[str, Any]:
    """A plain transformers checkpoint computing exactly the configuration; modifies the model in place.

    See ``remove_blocks``. The profile, including DeciLM/Nemotron-NAS style ``block_configs`` for
    runtimes that can skip no-op sub-blocks, goes to ``evopress_profile.json``.
    """
    space.apply(None)
    masks = space.masks(config)
    keep = remove_blocks(space, masks)
    model = space.decoder.model
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    profile = {
        "space": space.name, "target": space.target,
        "removed_blocks": [b for b in range(space.num_blocks) if b not in keep],
        "block_configs": block_configs(masks),
        "original_num_hidden_layers": space.num_blocks,
    }
    write_json(out / "evopress_profile.json", profile)
    return {"out": str(out), "num_hidden_layers": len(keep),
            "parameters": sum(p.numel() for p in model.parameters())}
