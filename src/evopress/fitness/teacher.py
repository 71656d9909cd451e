"""The dense model's targets per calibration window, computed once and kept in CPU RAM.

A window's entry (``kl.teacher_targets``: hidden-sized, not vocabulary-sized) is computed the first
time a sample touches it; ``Evaluator.warm`` does the whole pool up front. A stage moves only its
sample's entries to the model's device.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..data import TokenPool
from ..database import tensor_bytes
from ..hostmem import long_lived
from ..models import HEAD_BLOCK_BYTES, Decoder
from ..spaces.space import Space
from .kl import linear_head, teacher_targets


class TeacherCache:
    """Per pool window, the dense model's ``teacher_targets``, computed on first use, kept in CPU RAM."""

    def __init__(self, decoder: Decoder, pool: TokenPool, batch_size: int, chunk_tokens: int = 1024,
                 block_bytes: int = HEAD_BLOCK_BYTES):
        self.decoder = decoder
        self.pool = pool
        self.batch_size = batch_size
        self.chunk_tokens = chunk_tokens
        self.block_bytes = block_bytes
        self.store: dict[int, dict[str, torch.Tensor]] = {}
        self.keep_hidden = not linear_head(decoder)  # entries are normed hidden states (else hidden-space products)
        self.dense_head: tuple[torch.Tensor, torch.Tensor | None] | None = None  # for a space that compresses it

    @torch.inference_mode()
    def ensure(self, windows: Sequence[int], space: Space, progress: bool = False) -> int:
        """Compute the missing windows' entries; returns how many positions went through the LM head."""
        from tqdm.auto import tqdm

        keep_hidden = space.moves_embeddings or not linear_head(self.decoder)
        if keep_hidden != self.keep_hidden:  # entries made for another space's fitness (evaluations share caches)
            self.store.clear()
            self.keep_hidden = keep_hidden
        missing = [w for w in dict.fromkeys(windows) if w not in self.store]
        if not missing:
            return 0
        space.apply(None)
        if space.moves_embeddings and self.dense_head is None:
            head = self.decoder.head
            bias = getattr(head, "bias", None)
            with long_lived():
                self.dense_head = (head.weight.detach().clone(), None if bias is None else bias.detach().clone())
        starts = range(0, len(missing), self.batch_size)
        for s in tqdm(starts, desc="teacher", unit="batch", disable=not progress, leave=False):
            chunk = missing[s: s + self.batch_size]
            ids = self.pool.windows[chunk]
            h = self.decoder.final_hidden(ids)
            labels = ids[:, 1:].to(h.device)
            for w, row, y in zip(chunk, self.decoder.norm(h), labels):
                targets = self.targets(row[:-1], y)
                with long_lived():  # kept for the whole run (hostmem)
                    self.store[w] = {k: v.to("cpu", copy=True) for k, v in targets.items()}
        return 0 if self.keep_hidden else len(missing) * (self.pool.seq_len - 1)

    def targets(self, normed: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return teacher_targets(self.decoder, normed, labels, self.chunk_tokens, self.block_bytes, self.keep_hidden)

    def get(self, windows: Sequence[int], length: int) -> dict[str, torch.Tensor]:
        """Entries of the predicted positions of the first ``length`` tokens of each window, and their
        labels, concatenated in CPU RAM."""
        keys = self.store[windows[0]].keys()
        out = {k: torch.cat([self.store[w][k][: length - 1] for w in windows]) for k in keys}
        out["labels"] = self.pool.windows[windows, 1:length].reshape(-1)
        return out

    @property
    def nbytes(self) -> int:
        return sum(tensor_bytes(entry) for entry in self.store.values())
