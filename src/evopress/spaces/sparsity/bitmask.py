"""Sparsity export in compressed-tensors' ``sparse-bitmask`` layout: the zeros are not stored.

Each sparse linear layer ``<m>`` is stored as four tensors instead of ``<m>.weight``: ``<m>.shape``
(int64 [2]), ``<m>.compressed`` (the non-zero values in row-major order, the model's dtype),
``<m>.bitmask`` (uint8 [rows, ceil(cols / 8)], one bit per weight, least significant bit first, set
where the weight is non-zero) and ``<m>.row_offsets`` (int64 [rows], the index in ``compressed``
where each row starts). config.json's ``quantization_config`` is ``{"quant_method":
"compressed-tensors", "sparsity_config": {"format": "sparse-bitmask", "targets": [exact module
names], ...}}``. That is what compressed-tensors 0.14.0.1's ``BitmaskCompressor`` writes and reads:
its ``compress`` strips ``.weight`` from the parameter name before appending the part, and its
``decompress`` yields ``<m>.weight`` for the tensors nested under ``<m>``.

Who reads it: compressed-tensors removed its sparse compressors after 0.14.0.1 (0.15 and later,
including the 0.19/0.20 that transformers 5 needs, keep only the config class), so transformers 5
cannot load the layout by itself. ``load_sparse`` (and ``evopress.load_compressed``) builds the
architecture with transformers and decodes the layers; ``benchmarks/sparse_bitmask.py`` checks
the file against compressed-tensors 0.14.0.1's own decompressor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor

from ...errors import UserError
from ...io import write_json
from ..problem import Config
from ..checkpoint import WEIGHTS, load_decoded, model_tensors, write_checkpoint
from .export import PROFILE, profile
from .space import SparsitySpace

FORMAT = "sparse-bitmask"
PARTS = ("shape", "compressed", "bitmask", "row_offsets")


def to_bitmask(weight: Tensor) -> dict[str, Tensor]:
    """A 2-D weight as the four sparse-bitmask tensors (keys: ``PARTS``)."""
    mask = weight != 0
    counts = mask.sum(dim=-1)
    return {
        "shape": torch.tensor(list(weight.shape), dtype=torch.int64),
        "compressed": weight[mask].contiguous(),
        "bitmask": torch.from_numpy(np.packbits(mask.cpu().numpy(), axis=-1, bitorder="little")),
        "row_offsets": (torch.cumsum(counts, 0) - counts).to(torch.int64),
    }


def from_bitmask(parts: dict[str, Tensor]) -> Tensor:
    """Inverse of ``to_bitmask``."""
    shape = [int(x) for x in parts["shape"]]
    bits = np.unpackbits(parts["bitmask"].numpy(), axis=-1, count=shape[-1], bitorder="little")
    mask = torch.from_numpy(bits.reshape(shape).astype(bool))
    if int(mask.sum()) != parts["compressed"].numel():
        raise UserError(f"sparse-bitmask tensors disagree: {int(mask.sum())} bits set, "
                        f"{parts['compressed'].numel()} values stored")
    dense = torch.zeros(shape, dtype=parts["compressed"].dtype)
    dense[mask] = parts["compressed"]
    return dense


def sparsity_config(targets: list[str], global_sparsity: float) -> dict[str, Any]:
    return {"quant_method": "compressed-tensors", "transform_config": {},
            "sparsity_config": {"format": FORMAT, "targets": targets, "ignore": [],
                                "global_sparsity": global_sparsity, "sparsity_structure": "unstructured"}}


def write_bitmask(model: torch.nn.Module, layers: dict[str, torch.nn.Module], out: Path, tokenizer: Any) -> Path:
    """``model`` as a checkpoint with ``layers`` (module name -> linear) in sparse-bitmask form; the weights file."""
    tensors = model_tensors(model, {f"{name}.weight" for name in layers})
    zeros = total = 0
    for name, layer in layers.items():
        weight = layer.weight.detach().cpu()
        tensors.update({f"{name}.{k}": v for k, v in to_bitmask(weight).items()})
        zeros, total = zeros + int((weight == 0).sum()), total + weight.numel()
    return write_checkpoint(model, tensors, sparsity_config(list(layers), zeros / total), out, tokenizer)


def export_bitmask(space: SparsitySpace, config: Config, out: Path, tokenizer: Any) -> dict[str, Any]:
    """A sparse-bitmask checkpoint computing exactly ``config`` (see module doc); leaves the model at ``config``."""
    out = Path(out)
    space.apply(config)
    weights = write_bitmask(space.decoder.model, dict(zip(space.units, space.layers)), out, tokenizer)
    write_json(out / PROFILE, {**profile(space, config), "format": FORMAT})
    return {"out": str(out), "format": FORMAT, "achieved_sparsity": round(space.budget_report(config)["achieved"], 4),
            "weights_bytes": weights.stat().st_size, "profile": str(out / PROFILE)}


def read_sparse_weights(path: Path) -> dict[str, Tensor]:
    """All tensors of a sparse-bitmask checkpoint, the sparse layers decoded to ``<module>.weight``."""
    raw = load_file(str(Path(path) / WEIGHTS))
    modules = sorted(k[: -len(".bitmask")] for k in raw if k.endswith(".bitmask"))
    parts = {f"{m}.{p}" for m in modules for p in PARTS}
    out = {k: v for k, v in raw.items() if k not in parts}
    for m in modules:
        out[f"{m}.weight"] = from_bitmask({p: raw[f"{m}.{p}"] for p in PARTS})
    return out


def load(path: Path, config: dict[str, Any], dtype: torch.dtype) -> torch.nn.Module | None:
    """``load_sparse`` for a sparse-bitmask checkpoint (``SpacePlugin.load``); None for any other."""
    qc = config.get("quantization_config") or {}
    return load_sparse(path, dtype) if (qc.get("sparsity_config") or {}).get("format") == FORMAT else None


def load_sparse(path: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A sparse-bitmask checkpoint as a plain transformers model (dense weights with their zeros)."""
    return load_decoded(Path(path), read_sparse_weights, dtype)
