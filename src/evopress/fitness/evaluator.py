"""Scoring a stage's candidates: one shared sample, the teacher's entries, prefix reuse, one read-back.

Host syncs: a stage's labels and teacher entries go to the device once (or stream per batch from
pinned host memory when they exceed ``teacher_device_bytes``), KL sums stay on the device, and all
candidates' sums are read back once per stage: a GPU then never waits for the host inside a stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..data import Sample, TokenPool
from ..database import tensor_bytes
from ..errors import UserError
from ..hostmem import long_lived, trim_heap
from ..models import Decoder
from ..spaces.problem import Config
from ..spaces.space import Space
from .aggregate import AGGREGATES, Aggregate, Score
from .kl import block_bytes_for, compare, linear_head
from .prefix import boundary_stride, common_prefix, read_later
from .teacher import TeacherCache

METRICS = ("kl", "ppl")


@dataclass
class FitnessConfig:
    metric: str = "kl"  # "kl": mean KL(dense || candidate); "ppl": mean next-token NLL (log-perplexity)
    batch_size: int = 8  # windows per forward batch, unless batch_tokens is set
    batch_tokens: int | None = None  # tokens per forward batch (whole windows, at least one)
    chunk_tokens: int = 1024  # positions per LM-head chunk, at most (block_bytes may allow fewer)
    block_bytes: int | None = None  # bound on each vocab-sized temporary (logit block, fp32 head rows);
    # None: HEAD_BLOCK_BYTES on an accelerator, HOST_BLOCK_BYTES on the CPU (``block_bytes_for``)
    prefix_reuse: bool = True
    cache_bytes: int = 1 << 30  # memory for cached block-boundary activations
    teacher_device_bytes: int = 4 << 30  # a stage's teacher entries stay on the device when they fit
    profile: bool = False  # sync the device around timed steps so EvalStats' seconds are true (benchmarks)
    aggregate: str = "sources"  # one number from several calibration sources (``fitness.aggregate``)

    def windows_per_batch(self, seq_len: int) -> int:
        """Windows per forward batch: ``batch_tokens`` keeps a batch's activation memory fixed whatever
        the window length."""
        return max(1, self.batch_tokens // seq_len) if self.batch_tokens else self.batch_size


@dataclass
class Measurement:
    kl: float  # mean KL(dense || candidate) per predicted position, nats
    nll: float  # candidate's mean next-token NLL
    dense_nll: float  # the dense model's mean NLL on the same positions
    positions: int
    windows: np.ndarray  # per window of the sample [W, 3]: the sums of KL, NLL and dense NLL
    window_positions: np.ndarray  # per window: predicted positions
    sources: np.ndarray  # per window: index of its source in the pool's ``names``


@dataclass
class EvalStats:
    """Work counters, for benchmarks: how many block forwards actually ran, on how many tokens."""

    candidates: int = 0
    block_tokens: int = 0  # sum over executed block forwards of their token counts
    head_tokens: int = 0  # LM-head positions for candidates
    teacher_head_tokens: int = 0  # LM-head positions for the teacher
    naive_block_tokens: int = 0  # what running every candidate from the embeddings would cost
    # times: without FitnessConfig.profile a GPU's queued work lands in whichever step next waits on it
    seconds: float = 0.0  # wall time inside measure(): model forwards, teacher, KL
    block_seconds: float = 0.0  # of which candidate decoder-block forwards
    head_seconds: float = 0.0  # of which candidate LM head and KL
    teacher_seconds: float = 0.0  # of which dense forwards for windows not seen before
    apply_seconds: float = 0.0  # of which rewriting layers for the next candidate (space.apply)

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def to_device(entries: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """One batch's teacher entries and labels on the model's device (asynchronous from pinned memory)."""
    return {k: v.to(device, non_blocking=True) for k, v in entries.items()}


class Evaluator:
    """Scores configurations of one space on samples of one token pool."""

    def __init__(self, space: Space, pool: TokenPool, config: FitnessConfig | None = None,
                 teacher: TeacherCache | None = None):
        """``teacher``: another evaluator's cache for the same decoder and pool (its entries do not
        depend on the space), so several spaces on one model share one dense pass."""
        self.space = space
        self.decoder: Decoder = space.decoder  # type: ignore[attr-defined]
        self.pool = pool
        self.config = config or FitnessConfig()
        if self.config.metric not in METRICS:
            raise UserError(f"unknown fitness '{self.config.metric}' (choose from {', '.join(METRICS)})")
        if self.config.aggregate not in AGGREGATES:
            raise UserError(f"unknown --fitness-aggregate '{self.config.aggregate}' (choose from "
                            f"{', '.join(AGGREGATES)})")
        self.aggregate = Aggregate(self.config.aggregate, pool.names)
        self.batch_size = self.config.windows_per_batch(pool.seq_len)
        self.block_bytes = self.config.block_bytes or block_bytes_for(self.decoder.device)
        self.teacher = teacher or TeacherCache(self.decoder, pool, self.batch_size, self.config.chunk_tokens,
                                               self.block_bytes)
        self.stats = EvalStats()
        # non-linear heads, and compressed ones, recompute teacher logits
        self._teacher_per_candidate = not linear_head(self.decoder) or space.moves_embeddings

    def sample(self, tokens: int, rng: np.random.Generator) -> Sample:
        return self.pool.sample(tokens, rng)

    @staticmethod
    def sample_tokens(sample: Sample) -> int:
        return sample.tokens

    def warm(self, progress: bool = False) -> None:
        """Run the dense teacher over the whole pool now, with the model dense once instead of per stage.

        Why: a search touches every window within a few generations anyway, and each stage that meets a
        new window must restore the dense weights and then rewrite every layer for the next candidate.
        """
        self._ensure_teacher(range(len(self.pool.windows)), progress)
        trim_heap()  # the teacher pass's temporaries (hostmem)

    def score(self, configs: Sequence[Config], sample: Sample) -> list[Score]:
        """Fitness of each configuration on the sample (lower is better), with its per-window sums."""
        return [self.fitness_of(m) for m in self.measure(configs, sample)]

    def fitness_of(self, m: Measurement) -> Score:
        return self.aggregate.score(*self._metric(m))

    def noise(self, a: Score, b: Score) -> float:
        """The sampling noise of ``a - b`` for two scores on the same sample (``Aggregate.noise``)."""
        return self.aggregate.noise(a, b)

    def per_source(self, m: Measurement) -> dict[str, float]:
        """A measurement's mean KL on each calibration source its windows cover."""
        values = self.aggregate.per_source(m.windows[:, 0], m.window_positions, m.sources)
        return {name: float(v) for name, v in zip(self.pool.names, values) if not np.isnan(v)}

    def set_reference(self, config: Config, sample: Sample) -> dict[str, float]:
        """Normalise the per-source aggregates by ``config``'s per-source fitness on ``sample``."""
        m = self.measure([config], sample)[0]
        self.aggregate.reference = self.aggregate.per_source(*self._metric(m))
        return self.per_source(m)

    def _metric(self, m: Measurement) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per window: the fitness metric's sums, the positions and the source."""
        return m.windows[:, 0 if self.config.metric == "kl" else 1], m.window_positions, m.sources

    def measure(self, configs: Sequence[Config], sample: Sample) -> list[Measurement]:
        start = time.perf_counter()
        try:
            return self._measure(configs, sample)
        finally:
            self.stats.seconds += time.perf_counter() - start

    def _stride(self, tokens: int, candidates: int) -> int:
        L = self.decoder.num_blocks
        if not self.config.prefix_reuse:
            return L + 1
        param = self.decoder.head.weight
        return boundary_stride(L, candidates, tokens * param.shape[-1] * param.element_size(),
                               self.config.cache_bytes)

    def _ensure_teacher(self, windows: Sequence[int], progress: bool = False) -> None:
        t0 = self._clock()
        self.stats.teacher_head_tokens += self.teacher.ensure(windows, self.space, progress)
        self.stats.teacher_seconds += self._clock() - t0

    def _stage_targets(self, batches: list[tuple[torch.Tensor, list[int]]]
                       ) -> tuple[list[dict[str, torch.Tensor]], bool]:
        """The stage's teacher entries and labels per batch, and whether they are on the device: moved
        there once for the whole stage when they fit ``teacher_device_bytes``, else left in (pinned) host
        memory for ``_compare`` to copy per batch; a copy from pinned memory is asynchronous, so neither
        way makes the host wait."""
        host = [self.teacher.get(w, ids.shape[1]) for ids, w in batches]
        device = self.decoder.device
        if sum(tensor_bytes(t) for t in host) <= self.config.teacher_device_bytes:
            return [to_device(t, device) for t in host], True
        if device.type == "cuda":
            return [{k: v.pin_memory() for k, v in t.items()} for t in host], False
        return host, False

    @torch.inference_mode()
    def _measure(self, configs: Sequence[Config], sample: Sample) -> list[Measurement]:
        batches = self.pool.batches(sample, self.batch_size)
        self._ensure_teacher(sample.index)
        with long_lived():  # the stage's targets and block inputs outlive every candidate's temporaries
            targets, resident = self._stage_targets(batches)
            inputs = [self.decoder.enter(ids) for ids, _ in batches]
        L = self.decoder.num_blocks
        keys = [self.space.block_keys(c) for c in configs]
        stride = self._stride(sample.tokens, len(configs))
        cache: dict[int, list[torch.Tensor]] = {0: [inp.hidden for inp in inputs]}
        windows = [w for _, ws in batches for w in ws]
        sums = torch.zeros(len(configs), len(windows), 3, dtype=torch.float64, device=self.decoder.device)
        order = sorted(range(len(configs)), key=keys.__getitem__)
        shares = [common_prefix(keys[a], keys[b]) for a, b in zip(order, order[1:])]  # with the next one
        for n, i in enumerate(order):
            shared = shares[n - 1] if n else 0  # with the candidate before
            kept = read_later(shares[n:], stride)
            for b in [b for b in cache if b > shared]:
                del cache[b]
            start = max(cache)
            t_apply = self._clock()
            self.space.apply(configs[i])
            states = cache[start] if start or not self.space.moves_embeddings else \
                [self.decoder.enter(ids).hidden for ids, _ in batches]
            t0 = self._clock()
            self.stats.apply_seconds += t0 - t_apply
            for b in range(start, L):
                states = [self.decoder.run_block(b, h, inp) for h, inp in zip(states, inputs)]
                if b + 1 in kept:
                    cache[b + 1] = states
            t1 = self._clock()
            sums[i] = self._compare(states, targets, resident)
            self.stats.block_seconds += t1 - t0
            self.stats.head_seconds += self._clock() - t1
            self.stats.candidates += 1
            self.stats.block_tokens += (L - start) * sample.tokens
            self.stats.naive_block_tokens += L * sample.tokens
            self.stats.head_tokens += sample.tokens
            self.stats.teacher_head_tokens += sample.tokens if self._teacher_per_candidate else 0
        per_window = np.array([ids.shape[1] - 1 for ids, ws in batches for _ in ws], dtype=np.float64)
        sources = self.pool.labels[windows].numpy()
        positions = int(per_window.sum())
        return [Measurement(*(float(x) / max(positions, 1) for x in rows.sum(0)), positions, rows, per_window, sources)
                for rows in np.array(sums.tolist())]

    def _clock(self) -> float:
        """Wall time; with ``profile``, after the device's queued work. GPU kernels run asynchronously,
        so without a sync the block time lands in whichever step next waits on a result; but each sync
        drains the queue the device would otherwise keep full, so searches run without them."""
        device = self.decoder.device
        if self.config.profile and device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def _compare(self, states: list[torch.Tensor], targets: list[dict[str, torch.Tensor]],
                 resident: bool) -> torch.Tensor:
        """One candidate's summed KL, NLL and dense NLL per window of the stage's batches [W, 3], left on
        the device; targets not ``resident`` on the device are copied there one batch at a time."""
        device = self.decoder.device
        return torch.cat([compare(self.decoder, self.decoder.norm(h), t if resident else to_device(t, device),
                                  self.config.chunk_tokens, self.block_bytes, self.teacher.dense_head)
                          for h, t in zip(states, targets)])
