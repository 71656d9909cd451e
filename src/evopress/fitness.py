"""Fitness: KL(dense || candidate) per token, with a lazily built teacher cache and prefix reuse.

Teacher cache: instead of full-vocabulary teacher logits (tokens x vocab floats, hundreds of GB for a
real calibration pool) we keep the dense model's final *normed hidden states* (tokens x hidden) and
recompute teacher logits chunk by chunk through the LM head. A window's entry is computed the first
time a sample touches it, so short searches never pay for the whole pool.

Prefix reuse: all candidates of a stage share one sample, and a child differs from its parent in a
few units. Candidates are evaluated in lexicographic order of their per-block configuration; the
residual stream at block boundaries is kept for the previous candidate, so the next one starts at
the first block where the two differ. Boundaries are kept every ``stride`` blocks so their memory
stays under ``cache_bytes``; results are identical with or without reuse.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data import Sample, TokenPool
from .models import Decoder
from .spaces.base import Config, Space

METRICS = ("kl", "ppl")


@dataclass
class FitnessConfig:
    metric: str = "kl"  # "kl": mean KL(dense || candidate); "ppl": mean next-token NLL (log-perplexity)
    batch_size: int = 8
    chunk_tokens: int = 1024  # positions per LM-head chunk: bounds the vocab-sized temporaries
    prefix_reuse: bool = True
    cache_bytes: int = 1 << 30  # memory for cached block-boundary activations
    logit_cache_bytes: int = 1 << 30  # teacher log-probs of a sample are kept if they fit, else recomputed


@dataclass
class Measurement:
    kl: float  # mean KL(dense || candidate) per predicted position, nats
    nll: float  # candidate's mean next-token NLL
    dense_nll: float  # the dense model's mean NLL on the same positions
    positions: int


@dataclass
class EvalStats:
    """Work counters, for benchmarks: how many block forwards actually ran, on how many tokens."""

    candidates: int = 0
    block_tokens: int = 0  # sum over executed block forwards of their token counts
    head_tokens: int = 0  # LM-head positions for candidates
    teacher_head_tokens: int = 0  # LM-head positions for the teacher
    naive_block_tokens: int = 0  # what running every candidate from the embeddings would cost
    seconds: float = 0.0  # wall time inside measure(): model forwards, teacher, KL
    block_seconds: float = 0.0  # of which candidate decoder-block forwards
    head_seconds: float = 0.0  # of which candidate LM head, log-softmax and KL
    teacher_seconds: float = 0.0  # of which dense forwards and teacher log-probs for the sample
    apply_seconds: float = 0.0  # of which rewriting layers for the next candidate (space.apply)

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


class TeacherCache:
    """Dense final-normed hidden states per pool window, computed on first use."""

    def __init__(self, decoder: Decoder, pool: TokenPool, batch_size: int):
        self.decoder = decoder
        self.pool = pool
        self.batch_size = batch_size
        self.store: dict[int, torch.Tensor] = {}

    @torch.inference_mode()
    def ensure(self, windows: Sequence[int], space: Space) -> None:
        missing = [w for w in dict.fromkeys(windows) if w not in self.store]
        if not missing:
            return
        space.apply(None)
        for s in range(0, len(missing), self.batch_size):
            chunk = missing[s: s + self.batch_size]
            *_, h = self.decoder.run_blocks(self.pool.windows[chunk])
            for w, row in zip(chunk, self.decoder.norm(h)):
                self.store[w] = row.clone()

    def get(self, windows: Sequence[int], length: int) -> torch.Tensor:
        return torch.stack([self.store[w][:length] for w in windows])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.store.values())


def _common_prefix(a: tuple, b: tuple) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _flat(hidden: torch.Tensor) -> torch.Tensor:
    """[B, T, H] -> [B*(T-1), H]: the last position has no next token and is dropped."""
    return hidden[:, :-1].reshape(-1, hidden.shape[-1])


@torch.inference_mode()
def teacher_log_probs(decoder: Decoder, teacher: torch.Tensor, chunk_tokens: int) -> list[torch.Tensor]:
    t = _flat(teacher)
    return [F.log_softmax(decoder.logits(t[i: i + chunk_tokens]), dim=-1) for i in range(0, len(t), chunk_tokens)]


@torch.inference_mode()
def compare_logits(decoder: Decoder, student: torch.Tensor, teacher: torch.Tensor, input_ids: torch.Tensor,
                   chunk_tokens: int, teacher_lp: list[torch.Tensor] | None = None) -> tuple[float, float, float, int]:
    """Sums of KL(teacher || student), student NLL and teacher NLL over all predicted positions.

    Inputs are final-normed hidden states [B, T, H]. ``teacher_lp``, if given, holds the teacher's
    log-probs per chunk (computed once per sample); otherwise they are recomputed chunk by chunk.
    """
    s = _flat(student)
    t = _flat(teacher).to(s.device)
    labels = input_ids[:, 1:].reshape(-1).to(s.device)
    kl = nll = dense_nll = 0.0
    for c, i in enumerate(range(0, len(s), chunk_tokens)):
        log_q = F.log_softmax(decoder.logits(s[i: i + chunk_tokens]), dim=-1)
        log_p = teacher_lp[c] if teacher_lp is not None else \
            F.log_softmax(decoder.logits(t[i: i + chunk_tokens]), dim=-1)
        y = labels[i: i + chunk_tokens]
        kl += F.kl_div(log_q, log_p, log_target=True, reduction="sum").item()
        nll += F.nll_loss(log_q, y, reduction="sum").item()
        dense_nll += F.nll_loss(log_p, y, reduction="sum").item()
    return kl, nll, dense_nll, len(s)


class Evaluator:
    """Scores configurations of one space on samples of one token pool."""

    def __init__(self, space: Space, pool: TokenPool, config: FitnessConfig | None = None):
        self.space = space
        self.decoder: Decoder = space.decoder  # type: ignore[attr-defined]
        self.pool = pool
        self.config = config or FitnessConfig()
        if self.config.metric not in METRICS:
            from .errors import UserError

            raise UserError(f"unknown fitness '{self.config.metric}' (choose from {', '.join(METRICS)})")
        self.teacher = TeacherCache(self.decoder, pool, self.config.batch_size)
        self.stats = EvalStats()

    def sample(self, tokens: int, rng: np.random.Generator) -> Sample:
        return self.pool.sample(tokens, rng)

    @staticmethod
    def sample_tokens(sample: Sample) -> int:
        return sample.tokens

    def score(self, configs: Sequence[Config], sample: Sample) -> list[float]:
        """Fitness of each configuration on the sample; lower is better."""
        results = self.measure(configs, sample)
        return [m.kl if self.config.metric == "kl" else m.nll for m in results]

    def _stride(self, tokens: int) -> int:
        """Keep every stride-th block boundary so cached activations fit in ``cache_bytes``."""
        L = self.decoder.num_blocks
        if not self.config.prefix_reuse:
            return L + 1
        param = self.decoder.head.weight
        per_boundary = tokens * param.shape[-1] * param.element_size()
        allowed = self.config.cache_bytes // max(per_boundary, 1)
        return L + 1 if allowed < 1 else max(1, math.ceil((L - 1) / allowed))

    def measure(self, configs: Sequence[Config], sample: Sample) -> list[Measurement]:
        start = time.perf_counter()
        try:
            return self._measure(configs, sample)
        finally:
            self.stats.seconds += time.perf_counter() - start

    @torch.inference_mode()
    def _measure(self, configs: Sequence[Config], sample: Sample) -> list[Measurement]:
        batches = self.pool.batches(sample, self.config.batch_size)
        t0 = self._clock()
        self.teacher.ensure(sample.index, self.space)
        teacher_lp = self._teacher_log_probs(batches) if len(configs) > 1 else None
        self.stats.teacher_seconds += self._clock() - t0
        inputs = [self.decoder.enter(ids) for ids, _ in batches]
        L = self.decoder.num_blocks
        keys = [self.space.block_keys(c) for c in configs]
        stride = self._stride(sample.tokens)
        cache: dict[int, list[torch.Tensor]] = {0: [inp.hidden for inp in inputs]}
        previous: tuple | None = None
        results: list[Measurement | None] = [None] * len(configs)
        for i in sorted(range(len(configs)), key=keys.__getitem__):
            shared = _common_prefix(keys[i], previous) if previous is not None else 0
            for b in [b for b in cache if b > shared]:
                del cache[b]
            start = max(cache)
            t_apply = self._clock()
            self.space.apply(configs[i])
            states = cache[start]
            t0 = self._clock()
            self.stats.apply_seconds += t0 - t_apply
            for b in range(start, L):
                states = [self.decoder.run_block(b, h, inp) for h, inp in zip(states, inputs)]
                if (b + 1) % stride == 0 and b + 1 < L:
                    cache[b + 1] = states
            t1 = self._clock()
            results[i] = self._compare(states, batches, teacher_lp)
            self.stats.block_seconds += t1 - t0
            self.stats.head_seconds += self._clock() - t1
            previous = keys[i]
            self.stats.candidates += 1
            self.stats.block_tokens += (L - start) * sample.tokens
            self.stats.naive_block_tokens += L * sample.tokens
            self.stats.head_tokens += sample.tokens
            self.stats.teacher_head_tokens += sample.tokens if teacher_lp is None else 0
        return results  # type: ignore[return-value]

    def _clock(self) -> float:
        """Wall time after the device's queued work: GPU kernels run asynchronously, so without a
        sync the block time would land in whichever step next waits on a result (stats only)."""
        device = self.decoder.head.weight.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def _teacher_log_probs(self, batches: list[tuple[torch.Tensor, list[int]]]) -> list | None:
        """The sample's teacher log-probs, shared by all candidates, when they fit in the budget."""
        vocab = self.decoder.head.weight.shape[0]
        positions = sum(ids.shape[0] * (ids.shape[1] - 1) for ids, _ in batches)
        if positions * vocab * 4 > self.config.logit_cache_bytes:
            return None
        self.stats.teacher_head_tokens += positions
        return [teacher_log_probs(self.decoder, self.teacher.get(w, ids.shape[1]), self.config.chunk_tokens)
                for ids, w in batches]

    def _compare(self, states: list[torch.Tensor], batches: list[tuple[torch.Tensor, list[int]]],
                 teacher_lp: list | None) -> Measurement:
        kl = nll = dense_nll = 0.0
        positions = 0
        for b, (h, (ids, windows)) in enumerate(zip(states, batches)):
            teacher = self.teacher.get(windows, ids.shape[1])
            parts = compare_logits(self.decoder, self.decoder.norm(h), teacher, ids, self.config.chunk_tokens,
                                   teacher_lp[b] if teacher_lp is not None else None)
            kl, nll, dense_nll = kl + parts[0], nll + parts[1], dense_nll + parts[2]
            positions += parts[3]
        n = max(positions, 1)
        return Measurement(kl / n, nll / n, dense_nll / n, positions)
