"""Joint export: one compressed-tensors checkpoint computing exactly the searched configuration.

The depth export's ``remove_blocks`` removes whole dropped blocks (the config's block count shrinks)
and zeroes the bias of a lone dropped sub-block's output projection; the quant export's
``write_quantized`` writes every remaining linear layer packed at its searched bitwidth. A lone
dropped sub-block still has layers in a standard architecture: they are written as zero layers at
the lowest bitwidth (zero codes, zero points and scales), so the sub-block adds exactly zero to the
residual stream, as the depth space's dropped module does. Without sparsity levels these placeholders
are the only bytes the file holds beyond the searched size (``size_bytes``); ``evopress_profile.json``
lists them (``evopress_dropped``, indices of the exported blocks). ``evopress.load_compressed`` reads the checkpoint.

A pruned layer (``--with-sparsity``) has no sparse form in pack-quantized, so it is written as the
codes of its whole matrix at its bitwidth, pruned weights as exact zero codes: the checkpoint loads
wherever the quant export loads, and computes the searched weights exactly, but such a layer takes
``packed_bytes`` in the file instead of its searched ``combined.sparse_packed_bytes``. The profile's
``evopress_sparsity`` lists those layers, their sparsity and both sizes, and ``extra_bytes`` the total.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...compressors.gptq import QuantGrid, QuantizedWeight
from ..problem import Config
from ..drop.export import DROPPED, remove_blocks
from ..quant.export import GPTQMODEL, PROFILE, RECIPE, WEIGHTS, write_quantized
from ..quant.levels import packed_bytes
from .space import JointSpace

SPARSITY = "evopress_sparsity"  # the profile's entry for pruned layers


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
            layers[u] = space.quantized(u, config[u])
        else:
            layers[u] = zero_layer(quant.shapes[u], quant.grid(quant.bits[0]))
    budget = space.budget_report(config)  # before the blocks go: it reads the dense modules
    keep, dropped = remove_blocks(space.drop, masks)
    prefix = space.drop.units[0].rsplit(".", 2)[0]  # the blocks' ModuleList, e.g. model.layers
    names = {}
    for u in layers:
        b = space.unit_block[u]
        names[u] = f"{prefix}.{keep.index(b)}.{space.units[u][len(f'{prefix}.{b}.'):]}"
    sparse = sparsity_profile(space, config, {u: names[u] for u in layers if p.active(config, u)})
    out = Path(out)
    write_quantized(space.decoder.model, {names[u]: q for u, q in layers.items()}, out, tokenizer, quant.group_size,
                    quant.db.manifest,
                    {"space": space.name, "target": space.target, "budget": budget,
                     "removed_blocks": budget["removed_blocks"], DROPPED: dropped,
                     "original_num_hidden_layers": space.num_blocks, **sparse})
    summary = {"out": str(out), "weights_bytes": (out / WEIGHTS).stat().st_size, "searched_bytes": budget["bytes"],
               "num_hidden_layers": len(keep), "removed_blocks": budget["removed_blocks"],
               "layers_per_bitwidth": budget["layers_per_bitwidth"],
               "files": [WEIGHTS, "config.json", GPTQMODEL, RECIPE, PROFILE]}
    if sparse:
        pruned = sparse[SPARSITY]
        summary.update(sparse_layers=len(pruned["layers"]), sparse_extra_bytes=pruned["extra_bytes"])
    return summary


def sparsity_profile(space: JointSpace, config: Config, names: dict[int, str]) -> dict[str, Any]:
    """``{SPARSITY: ...}`` for a space with sparsity levels, else nothing: the kept pruned layers (by their
    exported ``names``) with their sparsity and sizes, and how many bytes the dense codes add."""
    if space.with_sparsity is None:
        return {}
    layers = {}
    for u, name in names.items():
        lv = space.levels[u][config[u]]
        if lv.sparse is not None:
            shape = space.quant.shapes[u]
            layers[name] = {"sparsity": lv.zeros / (shape[0] * shape[1]), "zeros": lv.zeros, "bits": lv.bits,
                            "searched_bytes": lv.cost,
                            "file_bytes": packed_bytes(lv.bits, shape, space.quant.grid(lv.bits))}
    extra = sum(e["file_bytes"] - e["searched_bytes"] for e in layers.values())
    return {SPARSITY: {"layers": layers, "extra_bytes": extra,
                       "note": "pruned layers are stored as dense pack-quantized codes (pruned weights: zero codes); "
                               "searched_bytes count a 1-bit mask and the non-zeros' codes (docs/joint.md)"}}
