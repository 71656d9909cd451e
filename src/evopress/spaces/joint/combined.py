"""Combined levels: a SparseGPT weight from the sparsity database, quantized at a quant database's bitwidth.

Pure functions (no model, no database): the byte count, the layout it counts, and the quantization.

Quantization: round-to-nearest on the quant database's grid (its group size, min-max per group,
asymmetric or symmetric as built, fp16 scale, integer zero point; ``gptq.quantize_rtn``). The grid's range always includes 0, so
0 quantizes to the zero point and dequantizes to exactly 0: pruned weights stay pruned. The mask is
re-applied to the codes anyway (``quantize_sparse``), so that holds by construction, not by rounding.
No Hessian is needed, so combined levels are made on demand from the two databases.

Layout (``encode``; what ``sparse_packed_bytes`` counts), per layer at ``b`` bits:

* ``weight_bitmask``: uint8, 1 bit per weight (row-major, least significant bit first), ceil(out x in / 8) bytes;
* ``weight_packed``: int32 [1, ceil(nnz x b / 32)], the codes of the non-zeros only, in row-major order,
  packed as one row of compressed-tensors' pack-quantized format;
* ``weight_scale``, ``weight_zero_point``, ``weight_shape``: exactly as pack-quantized stores them
  (fp16 scales and int32-packed zero points per group, none for a symmetric grid, the int64 shape;
  ``quant.export``).

No inference library reads this layout; it is the size the search counts. The export writes such a
layer as plain pack-quantized codes of the whole matrix (see ``joint.export``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...compressors.gptq import QuantGrid, QuantizedWeight, quantize_rtn
from ...compressors.packing import pack_codes, unpack_codes
from ..quant.export import pack_rows_int32, stored_grid, to_compressed_tensors, unpack_rows_int32, zero_points
from ..quant.levels import metadata_bytes, packed_bytes


def sparse_packed_bytes(non_zeros: int, bits: int, shape: tuple[int, int], grid: QuantGrid) -> int:
    """Bytes of one layer in the layout above: bitmask, packed codes of the non-zeros, scales, zero points, shape."""
    out, n = shape
    return -(-out * n // 8) + 4 * -(-non_zeros * bits // 32) + metadata_bytes(bits, shape, grid)


def worth_it(non_zeros: int, bits: int, shape: tuple[int, int], grid: QuantGrid) -> bool:
    """Whether the combined level costs fewer bytes than the same bitwidth without sparsity.

    Otherwise it is dominated: more bytes than the quant database's GPTQ weight at ``bits`` and a
    worse weight (pruned, and rounded without a Hessian), so it only wastes the search's moves.
    """
    return sparse_packed_bytes(non_zeros, bits, shape, grid) < packed_bytes(bits, shape, grid)


def quantize_sparse(weight: Tensor, mask: Tensor, grid: QuantGrid) -> QuantizedWeight:
    """Round-to-nearest on ``grid``; weights outside ``mask`` get their group's zero point (exact zeros)."""
    q = quantize_rtn(weight, grid)
    out, n = weight.shape
    zero_codes = q.zeros.repeat_interleave(grid.group_len(n), dim=1)
    return QuantizedWeight(torch.where(mask, q.codes, zero_codes), q.scales, q.zeros, grid)


def encode(q: QuantizedWeight, mask: Tensor) -> dict[str, Tensor]:
    """A combined layer in the layout above (``mask``: the sparse weight's non-zeros)."""
    parts = to_compressed_tensors(q)
    parts["weight_packed"] = pack_rows_int32(q.codes[mask][None], q.grid.bits)
    parts["weight_bitmask"] = pack_codes(mask.reshape(-1).to(torch.uint8), 1)
    return parts


def decode(parts: dict[str, Tensor], bits: int, group_size: int) -> tuple[QuantizedWeight, Tensor]:
    """Inverse of ``encode``: the layer (pruned weights at their zero points) and its mask."""
    out, n = (int(x) for x in parts["weight_shape"])
    mask = unpack_codes(parts["weight_bitmask"], 1, (out, n)).bool()
    scales = parts["weight_scale"]
    zeros = zero_points(parts, bits)
    codes = zeros.repeat_interleave(n // scales.shape[1], dim=1)
    codes[mask] = unpack_rows_int32(parts["weight_packed"], bits, int(mask.sum()))[0]
    return QuantizedWeight(codes, scales, zeros, stored_grid(parts, bits, group_size)), mask
