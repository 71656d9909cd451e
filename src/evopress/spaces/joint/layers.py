"""A joint layer unit's levels, and the weight store that adds combined levels to the quant space's layers.

Without ``--with-sparsity`` a layer's levels are the quant database's bitwidths (GPTQ weights). With
it, ``SparseQuantLayers`` (a ``QuantSpace`` that also reads a sparsity database, ``SparsitySpace``)
adds the combined levels of ``combined.py``: every sparsity level with pruned weights, quantized at
every bitwidth, where that costs fewer bytes than the bitwidth alone (``combined.worth_it``). Both
databases must describe the same model: each is checked against the model (fingerprint, layer
names) when it opens, and their layer shapes against each other here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from safetensors import safe_open

from ...compressors.gptq import QuantizedWeight
from ...compressors.packing import unpack_codes
from ...database import layer_file
from ...errors import UserError
from ...models import Decoder
from ...placement import to_device
from ..quant.levels import packed_bytes
from ..quant.space import QuantSpace
from ..sparsity.space import SparsitySpace
from ..sparsity.storage import decode_level, level_keys
from .combined import quantize_sparse, sparse_packed_bytes, worth_it


@dataclass(frozen=True)
class LayerLevel:
    """One level of a layer unit: which weight, at how many bits, and its true bytes."""

    key: int  # the weight store's level: a bitwidth index of the quant space, or past them a combined level
    bits: int
    cost: int  # bytes
    sparse: int | None = None  # level index in the sparsity database; None: the quant database's GPTQ weight
    zeros: int = 0  # pruned weights (the stored mask's zeros)


def quant_levels(quant: QuantSpace, u: int) -> list[LayerLevel]:
    return [LayerLevel(i, b, packed_bytes(b, quant.shapes[u], quant.grid(b))) for i, b in enumerate(quant.bits)]


class SparseQuantLayers(QuantSpace):
    """The quant space's layers; level ``len(bits) + j`` of layer ``u`` is ``combined[u][j]``.

    Only the joint space uses it, as the weight store behind ``apply`` and the export. Its own
    ``problem`` is the quant space's without a target (never searched) and lists the bitwidths only.
    """

    def __init__(self, decoder: Decoder, db: str | None, bits: Sequence[int] | None, sparsity_db: str):
        super().__init__(decoder, None, db=db, bits=bits)
        try:
            self.sparse = SparsitySpace(decoder, None, db=sparsity_db)
        except UserError as e:
            raise UserError(f"--with-sparsity {sparsity_db}: {e}") from None
        for name, mine, theirs in zip(self.units, self.shapes, self.sparse.shapes):
            if mine != theirs:
                raise UserError(f"--with-sparsity {sparsity_db}: {name} is {list(theirs)} there but {list(mine)} in "
                                f"quant database {self.db.root}; both must be built for the same model")
        self.combined = [self._combined(u) for u in range(len(self.units))]

    def _stored_non_zeros(self, u: int) -> list[int]:
        """Per sparsity level, the non-zeros its stored mask keeps (the length of its values, from the header)."""
        sparse = self.sparse
        with safe_open(str(layer_file(sparse.db.root, self.units[u])), framework="pt") as f:
            return [f.get_slice(level_keys(sparse.first_offsets[u] + lv)[1]).get_shape()[0]
                    for lv in range(len(sparse.zeros[u]))]

    def _combined(self, u: int) -> list[LayerLevel]:
        shape = self.shapes[u]
        numel = shape[0] * shape[1]
        out: list[LayerLevel] = []
        for lv, nnz in enumerate(self._stored_non_zeros(u)):
            if nnz == numel:
                continue  # sparsity 0: the GPTQ weights are better at every bitwidth
            for b in self.bits:
                if worth_it(nnz, b, shape, self.grid(b)):
                    cost = sparse_packed_bytes(nnz, b, shape, self.grid(b))
                    out.append(LayerLevel(len(self.bits) + len(out), b, cost, lv, numel - nnz))
        return out

    def levels(self, u: int) -> list[LayerLevel]:
        """Layer ``u``'s bitwidths and combined levels."""
        return quant_levels(self, u) + self.combined[u]

    def combined_weight(self, u: int, level: LayerLevel) -> QuantizedWeight:
        """The sparse weight at ``level.sparse``, quantized at ``level.bits`` (``combined.quantize_sparse``)."""
        assert level.sparse is not None
        mask_key, values_key = level_keys(self.sparse.first_offsets[u] + level.sparse)
        stored = self.sparse.stored(u, (mask_key, values_key))
        device, shape = self.device(u), self.shapes[u]
        packed_mask, values = to_device(stored[mask_key], device), to_device(stored[values_key], device)
        mask = unpack_codes(packed_mask, 1, shape).bool()
        return quantize_sparse(decode_level(packed_mask, values, shape, torch.float32), mask, self.grid(level.bits))

    def decode(self, u: int, level: int) -> torch.Tensor:
        if level < len(self.bits):
            return super().decode(u, level)
        weight = self.combined_weight(u, self.combined[u][level - len(self.bits)])
        return weight.dequantize(self.layers[u].weight.dtype)

    def check_calibration(self, pool: object) -> None:
        super().check_calibration(pool)
        self.sparse.check_calibration(pool)
