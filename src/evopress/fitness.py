"""Fitness: KL(dense || candidate) per token, with a lazily built teacher cache and prefix reuse.

Teacher cache: full-vocabulary teacher logits would take tokens x vocab floats (hundreds of GB for a
real calibration pool). For a linear LM head (z = W s + b) the KL needs far less, because
KL(p || softmax(z)) = sum p log p - p.b - (W^T p).s + logsumexp(z): per predicted position we keep the
hidden-sized vector u = W^T p and the scalar a = sum p log p - p.b (plus the dense NLL, for reports).
A candidate's KL then costs its own LM head and one logsumexp, with no vocabulary-sized pass over
teacher log-probs at all. Heads that are not linear (Gemma-2's logit soft-capping) keep the dense
final normed hidden states instead and recompute teacher log-probs chunk by chunk. A window's entry
is computed the first time a sample touches it (``Evaluator.warm`` does the whole pool up front), and
lives in CPU RAM; a stage moves only its sample's entries to the model's device.

Precision: in a bf16/fp16 model the LM head, logsumexp and hidden-space products are computed in
float32 (``Decoder.logits``), the teacher's softmax in float64, so the identity is as exact as in a
float32 model and the dense model scores 0. Every vocabulary-sized temporary is bounded by
``FitnessConfig.block_bytes`` (default ``block_bytes_for`` the device): positions are chunked so a
[positions, vocab] block fits it, and a half-precision head weight is upcast in blocks of vocabulary
rows that fit it.

Host syncs: a stage's labels and teacher entries go to the device once (or stream per batch from
pinned host memory when they exceed ``teacher_device_bytes``), KL sums stay on the device, and all
candidates' sums are read back once per stage: a GPU then never waits for the host inside a stage.

Prefix reuse: all candidates of a stage share one sample, and a child differs from its parent in a
few units. Candidates are evaluated in lexicographic order of their per-block configuration; the
residual stream at block boundaries is kept for the previous candidate, so the next one starts at
the first block where the two differ. Only the boundaries later candidates start from are kept
(``_read_later``): at most one per later candidate, none in a stage of one candidate (e.g. the final or
held-aside score). Boundaries are kept every ``stride`` blocks when that many would not fit
``cache_bytes``; results are identical with or without reuse.
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
from .database import tensor_bytes
from .hostmem import long_lived, trim_heap
from .models import HEAD_BLOCK_BYTES, Decoder, head_rows
from .spaces.base import Config, Space

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


def linear_head(decoder: Decoder) -> bool:
    """Whether logits are an affine function of the normed hidden state (the KL shortcut's condition)."""
    return isinstance(decoder.head, torch.nn.Linear) and not decoder.softcap


def _fp32_product(p: torch.Tensor, weight: torch.Tensor, rows: int) -> torch.Tensor:
    """p @ weight in float32, upcasting ``rows`` vocabulary rows of a bf16/fp16 head at a time
    (``head_rows``: a whole fp32 copy of a 128k-vocabulary head would be GBs of accelerator memory)."""
    out = p[:, :rows] @ weight[:rows].float()
    for i in range(rows, weight.shape[0], rows):
        out += p[:, i: i + rows] @ weight[i: i + rows].float()
    return out


HOST_BLOCK_BYTES = 32 << 20  # LM-head temporaries of a CPU model: host RAM, next to the database cache


def block_bytes_for(device: torch.device) -> int:
    """The default bound on LM-head temporaries. On the CPU they are host RAM, which also holds the model,
    the database cache and the teacher cache, and a 1,024-position chunk of a 49k vocabulary in float64
    is 384 MiB; a smaller block costs only more passes over the head weight (a few % of its matmul)."""
    return HOST_BLOCK_BYTES if device.type == "cpu" else HEAD_BLOCK_BYTES


def chunk_positions(chunk_tokens: int, block_bytes: int, vocab: int, itemsize: int) -> int:
    """Positions per LM-head chunk: at most ``chunk_tokens``, and few enough that one [positions, vocab]
    block of ``itemsize``-byte floats fits ``block_bytes`` (1,024 positions of a 128k vocabulary in
    float64 would be 1 GiB of accelerator memory next to the model)."""
    return max(1, min(chunk_tokens, block_bytes // (itemsize * vocab)))


@torch.inference_mode()
def teacher_targets(decoder: Decoder, normed: torch.Tensor, labels: torch.Tensor, chunk_tokens: int,
                    block_bytes: int = HEAD_BLOCK_BYTES) -> dict[str, torch.Tensor]:
    """What the KL against the dense model needs at each predicted position [N, H] (labels [N])."""
    if not linear_head(decoder):
        return {"hidden": normed}
    weight = decoder.head.weight
    # two float64 blocks are alive at once in a chunk (``_teacher_chunk``)
    step, rows = chunk_positions(chunk_tokens, block_bytes, len(weight), 16), head_rows(weight, block_bytes)
    chunks = [_teacher_chunk(decoder, normed[i: i + step], labels[i: i + step], block_bytes, rows)
              for i in range(0, len(normed), step)]
    return {k: torch.cat([c[k] for c in chunks]) for k in ("u", "a", "nll")}


def _teacher_chunk(decoder: Decoder, normed: torch.Tensor, labels: torch.Tensor, block_bytes: int,
                   rows: int) -> dict[str, torch.Tensor]:
    """One chunk of ``teacher_targets``. Its own function so that its vocabulary-sized blocks are freed
    before the next chunk's are made: a loop body would hold the previous chunk's until reassigned,
    doubling the peak. Within it, at most two float64 blocks live at once: ``log_p`` goes before ``p``
    is rounded to float32, and p . log_p is a batched dot product, not an elementwise product."""
    weight, bias = decoder.head.weight, decoder.head.bias
    # float64 once per position: a float32 softmax over a large vocabulary sums to 1 + ~1e-5, and
    # the identity multiplies that error by logsumexp (~20), a bias the full-logit KL mostly cancels
    log_p = F.log_softmax(decoder.logits(normed, block_bytes).double(), dim=-1)
    nll = -log_p.gather(1, labels[:, None]).squeeze(1).float()
    p = log_p.exp()
    a = torch.bmm(p[:, None, :], log_p[:, :, None]).view(-1)
    del log_p
    if bias is not None:
        a -= p @ bias.double()
    return {"a": a.float(), "u": _fp32_product(p.float(), weight, rows), "nll": nll}


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

    @torch.inference_mode()
    def ensure(self, windows: Sequence[int], space: Space, progress: bool = False) -> int:
        """Compute the missing windows' entries; returns how many positions went through the LM head."""
        from tqdm.auto import tqdm

        missing = [w for w in dict.fromkeys(windows) if w not in self.store]
        if not missing:
            return 0
        space.apply(None)
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
        return len(missing) * (self.pool.seq_len - 1) if linear_head(self.decoder) else 0

    def targets(self, normed: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return teacher_targets(self.decoder, normed, labels, self.chunk_tokens, self.block_bytes)

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


def _read_later(shares: list[int], stride: int) -> set[int]:
    """The block boundaries that later candidates of a stage start from, of one that shares ``shares[k]``
    leading blocks with the candidate after it (``shares[0]``: with the next one).

    In lexicographic order the (k+1)-th later candidate shares ``min(shares[:k + 1])`` blocks with this
    one, and it starts at the last kept boundary within them (every ``stride``-th). Keeping just those,
    not every boundary up to ``shares[0]``, leaves the blocks run unchanged and holds at most one
    boundary per later candidate.
    """
    kept, least = set(), math.inf
    for share in shares:
        least = min(least, share)
        kept.add(least // stride * stride)
    kept.discard(0)
    return kept


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


def logsumexp_(z: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dimension, overwriting ``z``. Why: ``torch.logsumexp`` allocates a
    vocabulary-sized temporary per chunk, and on CPU that allocation costs more than the exp (profiled)."""
    m = z.amax(dim=-1, keepdim=True)
    return z.sub_(m).exp_().sum(-1).log_().add_(m.squeeze(-1))


@torch.inference_mode()
def compare(decoder: Decoder, student: torch.Tensor, targets: dict[str, torch.Tensor], chunk_tokens: int,
            block_bytes: int = HEAD_BLOCK_BYTES) -> torch.Tensor:
    """Sums of KL(teacher || student), student NLL and teacher NLL over all predicted positions.

    ``student`` holds final-normed hidden states [B, T, H]; ``targets`` the teacher's entries and the
    labels for the same positions, on the device. The float64 sums [3] stay on the device: reading them
    would stall the device queue, so callers read many candidates' sums at once.
    """
    s = _flat(student)
    sums = torch.zeros(3, dtype=torch.float64, device=s.device)
    step = chunk_positions(chunk_tokens, block_bytes, decoder.head.weight.shape[0], 4)
    for i in range(0, len(s), step):
        sums += _compare_chunk(decoder, s[i: i + step], {k: v[i: i + step] for k, v in targets.items()},
                               block_bytes)
    return sums


def _compare_chunk(decoder: Decoder, part: torch.Tensor, targets: dict[str, torch.Tensor],
                   block_bytes: int) -> torch.Tensor:
    """``compare``'s sums over one chunk of positions; its own function so that the chunk's logits are
    freed before the next chunk's are made (a loop body would hold two blocks at once)."""
    z = decoder.logits(part, block_bytes)
    y = targets["labels"]
    z_y = z.gather(1, y[:, None]).squeeze(1)
    if "u" in targets:  # linear head: the hidden-space identity (module docstring)
        lse = logsumexp_(z)
        kl = targets["a"] + lse - (part.float() * targets["u"]).sum(-1)
        dense_nll = targets["nll"]
    else:
        lse = torch.logsumexp(z, dim=-1)
        log_p = F.log_softmax(decoder.logits(targets["hidden"], block_bytes), dim=-1)
        kl = (log_p.exp() * (log_p - (z - lse[:, None]))).sum(-1)
        dense_nll = -log_p.gather(1, y[:, None]).squeeze(1)
    return torch.stack([kl, lse - z_y, dense_nll]).double().sum(-1)


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
            from .errors import UserError

            raise UserError(f"unknown fitness '{self.config.metric}' (choose from {', '.join(METRICS)})")
        self.batch_size = self.config.windows_per_batch(pool.seq_len)
        self.block_bytes = self.config.block_bytes or block_bytes_for(self.decoder.device)
        self.teacher = teacher or TeacherCache(self.decoder, pool, self.batch_size, self.config.chunk_tokens,
                                               self.block_bytes)
        self.stats = EvalStats()
        self._teacher_per_candidate = not linear_head(self.decoder)  # non-linear heads recompute teacher logits

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

    def score(self, configs: Sequence[Config], sample: Sample) -> list[float]:
        """Fitness of each configuration on the sample; lower is better."""
        results = self.measure(configs, sample)
        return [m.kl if self.config.metric == "kl" else m.nll for m in results]

    def _stride(self, tokens: int, candidates: int) -> int:
        """Keep every stride-th block boundary so cached activations fit in ``cache_bytes``. At most one
        boundary per later candidate is kept (``_read_later``), so a stage of few candidates keeps all."""
        L = self.decoder.num_blocks
        if not self.config.prefix_reuse:
            return L + 1
        param = self.decoder.head.weight
        per_boundary = tokens * param.shape[-1] * param.element_size()
        allowed = self.config.cache_bytes // max(per_boundary, 1)
        if allowed < 1:
            return L + 1
        return 1 if candidates - 1 <= allowed else max(1, math.ceil((L - 1) / allowed))

    def measure(self, configs: Sequence[Config], sample: Sample) -> list[Measurement]:
        start = time.perf_counter()
        try:
            return self._measure(configs, sample)
        finally:
            self.stats.seconds += time.perf_counter() - start

    def _ensure_teacher(self, windows: Sequence[int], progress: bool = False) -> None:
        t0 = self._clock()
        self.stats.teacher_head_tokens += self.teacher.ensure(windows, self.space, progress)
        self.stats.teacher_seconds += self._clock() - t0

    def _stage_targets(self, batches: list[tuple[torch.Tensor, list[int]]]) -> list[dict[str, torch.Tensor]]:
        """The stage's teacher entries and labels per batch: moved to the device once for the whole stage
        when they fit ``teacher_device_bytes``, else left in (pinned) host memory for ``_compare`` to copy
        per batch; a copy from pinned memory is asynchronous, so neither way makes the host wait."""
        host = [self.teacher.get(w, ids.shape[1]) for ids, w in batches]
        device = self.decoder.device
        if sum(tensor_bytes(t) for t in host) <= self.config.teacher_device_bytes:
            return [{k: v.to(device) for k, v in t.items()} for t in host]
        if device.type == "cuda":
            return [{k: v.pin_memory() for k, v in t.items()} for t in host]
        return host

    @torch.inference_mode()
    def _measure(self, configs: Sequence[Config], sample: Sample) -> list[Measurement]:
        batches = self.pool.batches(sample, self.batch_size)
        self._ensure_teacher(sample.index)
        with long_lived():  # the stage's targets and block inputs outlive every candidate's temporaries
            targets = self._stage_targets(batches)
            inputs = [self.decoder.enter(ids) for ids, _ in batches]
        L = self.decoder.num_blocks
        keys = [self.space.block_keys(c) for c in configs]
        stride = self._stride(sample.tokens, len(configs))
        cache: dict[int, list[torch.Tensor]] = {0: [inp.hidden for inp in inputs]}
        sums = torch.zeros(len(configs), 3, dtype=torch.float64, device=self.decoder.device)
        order = sorted(range(len(configs)), key=keys.__getitem__)
        shares = [_common_prefix(keys[a], keys[b]) for a, b in zip(order, order[1:])]  # with the next one
        for n, i in enumerate(order):
            shared = shares[n - 1] if n else 0  # with the candidate before
            kept = _read_later(shares[n:], stride)
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
                if b + 1 in kept:
                    cache[b + 1] = states
            t1 = self._clock()
            sums[i] = self._compare(states, targets)
            self.stats.block_seconds += t1 - t0
            self.stats.head_seconds += self._clock() - t1
            self.stats.candidates += 1
            self.stats.block_tokens += (L - start) * sample.tokens
            self.stats.naive_block_tokens += L * sample.tokens
            self.stats.head_tokens += sample.tokens
            self.stats.teacher_head_tokens += sample.tokens if self._teacher_per_candidate else 0
        positions = sum(ids.shape[0] * (ids.shape[1] - 1) for ids, _ in batches)
        return [Measurement(*(x / max(positions, 1) for x in row), positions) for row in sums.tolist()]

    def _clock(self) -> float:
        """Wall time; with ``profile``, after the device's queued work. GPU kernels run asynchronously,
        so without a sync the block time lands in whichever step next waits on a result; but each sync
        drains the queue the device would otherwise keep full, so searches run without them."""
        device = self.decoder.device
        if self.config.profile and device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def _compare(self, states: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """One candidate's summed KL, NLL and dense NLL over the stage's batches, left on the device."""
        device = self.decoder.device
        total = torch.zeros(3, dtype=torch.float64, device=device)
        for h, t in zip(states, targets):
            if t["labels"].device != device:  # a stage too big for the device: copy from pinned memory
                t = {k: v.to(device, non_blocking=True) for k, v in t.items()}
            total += compare(self.decoder, self.decoder.norm(h), t, self.config.chunk_tokens, self.block_bytes)
        return total
