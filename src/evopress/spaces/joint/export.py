"""Joint export: one compressed-tensors checkpoint computing exactly the searched configuration.

The depth export's ``remove_blocks`` removes whole dropped blocks (the config's block count shrinks)
and zeroes the bias of a lone dropped sub-block's output projection; the quant export's
``write_quantized`` writes every remaining linear layer packed at its searched bitwidth. A lone
dropped sub-block still has layers in a standard architecture: they are written as zero layers at
the lowest bitwidth (zero codes, zero points and scales), so the sub-block adds exactly zero to the
residual stream, as the depth space's dropped module does. These placeholders are the only bytes the
file holds beyond the searched size (``size_bytes``); ``evopress_profile.json`` lists them
(``evopress_dropped``, indices of the exported blocks). ``evopress.load_compressed`` reads the checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...compressors.gptq import QuantGrid, QuantizedWeight
from ..base import Config
from ..drop.export import DROPPED, remove_blocks
from ..quant.export import GPTQMODEL, PROFILE, RECIPE, WEIGHTS, write_quantized
from .space import JointSpace


def zero_layer(shape: tuple[int, int], grid: QuantGrid) -> QuantizedWeight:
    """A quantized layer that dequantizes to exact zeros."""
    out, n = shape
    groups = n // grid.group_len(n)
    return QuantizedWeight(torch.zeros(out, n, dtype=torch.uint8), torch.zeros(out, groups, dtype=torch.float16),
                           torch.zeros(out, groups, dtype=torch.uint8), grid)


def export(space: JointSpace, config: Config, out: Path, tokenizer: Any) -> dict[str, Any]:
    """Write the checkpoint for ``config`` (see module doc); modifies the model in place (blocks removed)."""
    space.apply(None)
    masks = space.dropped(config)
    quant, p = space.quant, space.problem
    layers: dict[int, QuantizedWeight] = {}
    for u in range(space.layers):
        b = space.unit_block[u]
        if all(masks[b]):
            continue  # the whole block goes
        if p.active(config, u):
            layers[u] = quant.quantized(u, quant.bits[config[u]])
        else:
            layers[u] = zero_layer(quant.shapes[u], quant.grid(quant.bits[0]))
    budget = space.budget_report(config)  # before the blocks go: it reads the dense modules
    keep, dropped = remove_blocks(space.drop, masks)
    prefix = space.drop.units[0].rsplit(".", 2)[0]  # the blocks' ModuleList, e.g. model.layers
    renamed = {}
    for u, q in layers.items():
        b = space.unit_block[u]
        rest = space.units[u][len(f"{prefix}.{b}."):]
        renamed[f"{prefix}.{keep.index(b)}.{rest}"] = q
    out = Path(out)
    write_quantized(space.decoder.model, renamed, out, tokenizer, quant.group_size, quant.db.manifest["damp"],
                    {"space": space.name, "target": space.target, "budget": budget,
                     "removed_blocks": budget["removed_blocks"], DROPPED: dropped,
                     "original_num_hidden_layers": space.num_blocks})
    return {"out": str(out), "weights_bytes": (out / WEIGHTS).stat().st_size, "searched_bytes": budget["bytes"],
            "num_hidden_layers": len(keep), "removed_blocks": budget["removed_blocks"],
            "layers_per_bitwidth": budget["layers_per_bitwidth"],
            "files": [WEIGHTS, "config.json", GPTQMODEL, RECIPE, PROFILE]}
