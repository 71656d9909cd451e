"""Finalize a bit profile: each layer GPTQ-quantized again at its chosen bitwidth (``spaces/finalize.py``)."""

from __future__ import annotations

import torch

from ...compressors.gptq import QuantizedWeight, gptq_quantize_levels
from ...database import Database, single_thread
from ..finalize import LayerJob
from ..problem import Config
from .build import packed_keys
from .space import QuantSpace


def quant_job(space: QuantSpace, u: int, bits: int) -> LayerJob:
    """Layer ``u`` at ``bits`` with the database's grid and solver settings (damping, column order)."""
    manifest, grid, keys = space.db.manifest, space.grid(bits), packed_keys(bits)

    def solve(layer: torch.nn.Linear, acc) -> dict[str, torch.Tensor]:
        with single_thread():  # GPTQ's column loop (see single_thread)
            q = gptq_quantize_levels(layer.weight, acc.hessian(), [grid], damp=manifest["damp"],
                                     act_order=bool(manifest.get("act_order", False)))[0]
        return {keys[k]: v for k, v in q.to_packed().items()}

    def weight(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        packed = {k: tensors[key].to(space.device(u)) for k, key in keys.items()}
        return QuantizedWeight.from_packed(packed, space.shapes[u], grid).dequantize(torch.float32)

    return LayerJob(list(keys.values()), solve, weight)


def finalize_jobs(space: QuantSpace, config: Config) -> tuple[Database, dict[str, LayerJob]]:
    return space.db, {name: quant_job(space, u, bits) for u, (name, bits) in enumerate(space.layer_bits(config).items())}
