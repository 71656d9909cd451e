"""Dense bit-packing of b-bit integer codes into bytes.

Codes are laid out as one little-endian bitstream: code k occupies stream bits
[k*b, (k+1)*b) with its least significant bit first, and byte m holds stream bits
[8m, 8m+8) with bit 0 as the byte's LSB. Any 8 consecutive codes fill exactly b
bytes, so we pack in chunks of 8 codes through one int64 accumulator (at most
8*7 = 56 bits are used); this keeps the work vectorised even for bitwidths such as
3 or 5 whose codes straddle byte boundaries.
"""

from __future__ import annotations

import torch
from torch import Tensor

_CHUNK = 8  # codes per chunk; a chunk of b-bit codes is exactly b bytes


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")


def packed_numel(numel: int, bits: int) -> int:
    """Number of bytes needed for `numel` codes of `bits` bits each."""
    return (numel * bits + 7) // 8


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack uint8 codes (< 2**bits, any shape) into a 1-D uint8 bitstream of ceil(numel*bits/8) bytes."""
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    flat = codes.reshape(-1)
    if flat.numel() and int(flat.max()) >= 1 << bits:
        raise ValueError(f"codes must be < 2**{bits}, got max {int(flat.max())}")
    if bits == 8:
        return flat.clone()
    n = flat.numel()
    chunks = torch.nn.functional.pad(flat, (0, -n % _CHUNK)).view(-1, _CHUNK).long()
    shifts = torch.arange(_CHUNK, device=codes.device) * bits
    acc = (chunks << shifts).sum(dim=1)  # bit fields are disjoint, so sum == bitwise or
    byte_shifts = torch.arange(bits, device=codes.device) * 8
    packed = ((acc[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return packed[: packed_numel(n, bits)]


def unpack_codes(packed: Tensor, bits: int, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Exact inverse of `pack_codes`: return uint8 codes of the given shape."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise TypeError(f"packed must be a 1-D uint8 tensor, got {packed.dtype} of dim {packed.dim()}")
    n = torch.Size(shape).numel()
    if packed.numel() != packed_numel(n, bits):
        raise ValueError(f"expected {packed_numel(n, bits)} bytes for {n} {bits}-bit codes, got {packed.numel()}")
    if bits == 8:
        return packed.clone().view(shape)
    if 8 % bits == 0:  # 1, 2, 4 bits: codes never straddle a byte, so shift bytes in uint8 (4x less memory)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:n].view(shape)
    chunks = torch.nn.functional.pad(packed, (0, -packed.numel() % bits)).view(-1, bits).long()
    byte_shifts = torch.arange(bits, device=packed.device) * 8
    acc = (chunks << byte_shifts).sum(dim=1)
    shifts = torch.arange(_CHUNK, device=packed.device) * bits
    codes = ((acc[:, None] >> shifts) & ((1 << bits) - 1)).to(torch.uint8).reshape(-1)
    return codes[:n].view(shape)
