"""How a sparsity level is stored: a 1-bit mask of its non-zeros plus their values.

About ``0.125 + 2 * density`` bytes per weight instead of 2 for a dense fp16 copy per level. The
search, evaluation and export all decode the same stored values, so they agree bit for bit.
"""

from __future__ import annotations

import torch

from ...compressors.packing import pack_codes, unpack_codes
from ...database import value_dtype


def level_keys(offset: int) -> tuple[str, str]:
    """Names of one level's tensors in a layer file: its packed mask and its non-zero values."""
    return f"{offset}.mask", f"{offset}.values"


def encode_level(offset: int, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    mask = weight != 0
    mask_key, values_key = level_keys(offset)
    return {mask_key: pack_codes(mask.to(torch.uint8).reshape(-1), 1),
            values_key: weight[mask].to(value_dtype(weight.dtype))}


def decode_level(mask: torch.Tensor, values: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    keep = unpack_codes(mask, 1, shape).bool()
    return torch.zeros(shape, dtype=dtype, device=values.device).masked_scatter_(keep, values.to(dtype))
