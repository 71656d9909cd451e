"""Finalize a bit profile: each layer GPTQ-quantized again at its chosen bitwidth (``spaces/finalize.py``)."""

from __future__ import annotations

import torch

from ...compressors.gptq import gptq_quantize_levels
from ...database import Database, single_thread
from ..finalize import LayerJob
from ..problem import Config
from .build import from_level, packed_keys, to_level
from .space import QuantSpace


def quant_job(space: QuantSpace, u: int, bits: int) -> LayerJob:
    """Layer ``u`` at ``bits`` with the database's grid and solver settings (damping, column order)."""
    manifest, grid = space.db.manifest, space.grid(bits)

    def solve(layer: torch.nn.Linear, acc) -> dict[str, torch.Tensor]:
        with single_thread():  # GPTQ's column loop (see single_thread)
            q = gptq_quantize_levels(layer.weight, acc.hessian(), [grid], damp=manifest["damp"],
                                     act_order=bool(manifest.get("act_order", False)))[0]
        return to_level(q)

    def weight(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return from_level(tensors, space.shapes[u], grid).dequantize(torch.float32)

    return LayerJob(list(packed_keys(bits).values()), solve, weight)


def finalize_jobs(space: QuantSpace, config: Config) -> tuple[Database, dict[str, LayerJob]]:
    return space.db, {name: quant_job(space, u, bits)
                      for u, (name, bits) in enumerate(space.layer_bits(config).items())}
