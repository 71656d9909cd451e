"""Quant database build: GPTQ of every linear layer at every bitwidth, stored packed.

Each bitwidth is an independent GPTQ pass over one shared Hessian (block 128). The grid is min-max
asymmetric by default; ``--symmetric`` builds GPTQ's symmetric grid (zero point 2^(b-1), scale from
max|w|), which costs quality but gives checkpoints that plain ``transformers`` loads (``export``). Act-order by default: columns in descending order of the Hessian's diagonal with static groups,
so the packed format (groups in column order) and the exports stay as without it; it is llm-compressor's
default too, and without it the database's levels were far weaker than that library's GPTQ of the same
profile (docs/quant.md). ``--no-act-order`` builds the paper's "FastOBQ" order. After a block is done,
its ``calib_bits`` version is written into the model, so later blocks are calibrated on inputs of a quantized model, as in the
reference (``calib_bits=0``: dense inputs). Layers are stored packed (codes and zero points
bit-packed, fp16 scales), never dequantized, with each level's relative output error for the DP
baseline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...compressors.gptq import QuantGrid, QuantizedWeight, gptq_quantize_levels
from ...compressors.hessian import HessianAccumulator
from ...data import TokenPool
from ...database import single_thread
from ...errors import UserError
from ...models import Decoder
from ..layerwise import build_layerwise
from .levels import default_group_size, parse_bits

DEFAULT_CALIB_BITS = 3  # the paper's calibration bitwidth; 0 builds every block on dense inputs
PACKED = ("codes", "scales", "zeros")  # per bitwidth in a layer file: packed codes, fp16 scales, packed zero points


def packed_keys(bits: int) -> dict[str, str]:
    """Names of one bitwidth's tensors in a layer file, by the part of ``QuantizedWeight.to_packed`` they hold."""
    return {k: f"{bits}.{k}" for k in PACKED}


def to_level(q: QuantizedWeight) -> dict[str, torch.Tensor]:
    """``q``'s packed tensors under its bitwidth's names in a layer file."""
    return {packed_keys(q.grid.bits)[k]: v for k, v in q.to_packed().items()}


def from_level(tensors: dict[str, torch.Tensor], shape: tuple[int, int], grid: QuantGrid) -> QuantizedWeight:
    """The ``grid.bits`` level among a layer file's ``tensors`` (the inverse of ``to_level``)."""
    return QuantizedWeight.from_packed({k: tensors[key] for k, key in packed_keys(grid.bits).items()}, shape, grid)


def _relative_error(weight: torch.Tensor, q: QuantizedWeight, H: torch.Tensor) -> float:
    """Layer output error tr(dW H dW^T) / tr(W H W^T): the per-layer proxy the DP baseline adds up."""
    W = weight.float()
    dW = W - q.dequantize(torch.float32).to(W.device)
    return float(((dW @ H) * dW).sum() / ((W @ H) * W).sum().clamp_min(1e-30))


def build_quant_database(decoder: Decoder, pool: TokenPool, out: Path, bits: tuple[int, ...], group_size: int,
                         calib_bits: int, batch_size: int, damp: float = 0.01,
                         progress: bool = True, act_order: bool = True, symmetric: bool = False) -> dict[str, Any]:
    """GPTQ every linear layer at every bitwidth (see the module docstring).

    Leaves the model's linear weights at ``calib_bits``.
    """
    if calib_bits and calib_bits not in bits:
        raise UserError(f"--calib-bits {calib_bits} must be one of --bits {','.join(map(str, bits))} (or 0: dense)")
    shapes = {name: tuple(m.weight.shape) for name, m in decoder.linear_layers().items()}
    try:
        grids = [QuantGrid(b, group_size, symmetric) for b in bits]
        for shape in shapes.values():
            grids[0].group_len(shape[1])
    except ValueError as e:
        raise UserError(f"--group-size {group_size}: {e}; choose one dividing every layer's in_features "
                        "or -1 for per-channel") from e
    keys = [key for g in grids for key in packed_keys(g.bits).values()] + ["errors"]
    errors: dict[str, dict[str, float]] = {}

    def solve(name: str, layer: nn.Linear, acc: HessianAccumulator) -> dict[str, torch.Tensor]:
        H = acc.hessian()
        with single_thread():  # GPTQ's column loop (see single_thread)
            levels = gptq_quantize_levels(layer.weight, H, grids, damp=damp, act_order=act_order)
        rel = [_relative_error(layer.weight, q, H) for q in levels]
        return {**{k: v for q in levels for k, v in to_level(q).items()},
                "errors": torch.tensor(rel, dtype=torch.float64)}

    def install_calibration_level(name: str, layer: nn.Linear, tensors: dict[str, torch.Tensor]) -> None:
        errors[name] = {str(g.bits): e for g, e in zip(grids, tensors["errors"].tolist())}
        if calib_bits:
            calib = from_level(tensors, shapes[name], QuantGrid(calib_bits, group_size, symmetric))
            layer.weight.data.copy_(calib.dequantize(layer.weight.dtype).to(layer.weight.device))

    def describe() -> dict[str, Any]:
        return {
            "calibration": {"tokens": pool.tokens, "seq_len": pool.seq_len},
            "method": "gptq",
            "bits": list(bits),
            "group_size": group_size,
            "symmetric": symmetric,
            "act_order": act_order,
            "block_size": 128,
            "damp": damp,
            "calib_bits": calib_bits,
            "layers": {name: list(shape) for name, shape in shapes.items()},
            "errors": errors,
            "error_metric": "tr(dW H dW^T) / tr(W H W^T) on the database's calibration inputs",
        }

    settings = {"bits": list(bits), "group_size": group_size, "calib_bits": calib_bits, "damp": damp,
                "act_order": act_order, "symmetric": symmetric}
    return build_layerwise(decoder, pool, out, "quant", settings, lambda name: keys, solve, describe, batch_size,
                           progress, after=install_calibration_level)


def build(decoder: Decoder, pool: TokenPool, options: dict[str, Any], out: Path, batch_size: int,
          progress: bool) -> dict[str, Any]:
    """The plugin's builder: ``build-db --space quant`` options to ``build_quant_database``."""
    bits = parse_bits(options["bits"])
    in_features = [m.in_features for m in decoder.linear_layers().values()]
    group_size = options["group_size"] if options["group_size"] is not None else default_group_size(in_features)
    calib_bits = DEFAULT_CALIB_BITS if options["calib_bits"] is None else options["calib_bits"]
    return build_quant_database(decoder, pool, out, bits, group_size, calib_bits, batch_size, progress=progress,
                                act_order=not options["no_act_order"], symmetric=options["symmetric"])
