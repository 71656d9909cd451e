"""Candidate-parallel evaluation under torchrun (torch.distributed; gloo on CPU, nccl on GPUs).

Every rank runs the same search with the same seed, so all ranks draw the same children and samples.
Only fitness evaluation is split: each stage's candidates, in the evaluator's lexicographic order,
are cut into contiguous shares (neighbours share prefixes, so prefix reuse keeps working inside a
share); each rank scores its share and the scores are all-gathered. Every rank then selects the same
survivor, and because a candidate's score is computed by exactly the same operations whichever rank
runs it, the result equals a single-process run bit for bit. We split candidates rather than tokens
for that reason: a token split would sum partial KLs in a different order and could flip near-ties.

Every entry point that evaluates candidates (``evopress search | baseline | run`` and ``evopress.run``,
which the Python API's ``search`` and ``baseline`` call) runs inside ``session()``: the ranks join the
group, check that they were started with the same settings, and leave it at the end. Rank 0 alone
touches --out (lock, checks, checkpoint, files) and hands what it read to the others (``from_main``).
Collectives time out (``EVOPRESS_DIST_TIMEOUT``, seconds) so a dead rank ends the run with an error
instead of a hang.
"""

from __future__ import annotations

import functools
import itertools
import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.rendezvous import rendezvous

from .errors import UserError
from .spaces.problem import Config

T = TypeVar("T")

_GROUPS = itertools.count()  # groups this process joined: each keeps its rendezvous keys under its own prefix


class RankFailed(RuntimeError):
    """A collective failed on this rank: a peer died, or did not answer within EVOPRESS_DIST_TIMEOUT."""


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def main_only(log: Callable[[str], None]) -> Callable[[str], None]:
    """``log`` on rank 0, silence elsewhere: one voice per run."""
    return log if is_main() else (lambda msg: None)


def _timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get("EVOPRESS_DIST_TIMEOUT", "600")))


@functools.cache
def _rendezvous() -> tuple[dist.Store, int, int]:
    """torchrun's rendezvous (env://), made once per process and shared by every group it joins.

    A process that runs twice (a script calling ``evopress.search`` then ``evopress.baseline``) cannot
    simply init the default group again: rank 0 would rebuild its store on a port where a faster peer
    may still find the old one, and torchrun's agent store still holds the first group's keys.
    """
    store, me, world = next(rendezvous("env://", timeout=_timeout()))
    return store, me, world


def _join() -> bool:
    """Join the process group torchrun describes; False when not under torchrun or already in a group."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    store, me, world = _rendezvous()
    if torch.cuda.is_available():
        torch.cuda.set_device(_first_gpu(int(os.environ.get("LOCAL_RANK", "0")),
                                         int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count()))
        backend = "nccl"
    else:
        backend = "gloo"
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    dist.init_process_group(backend, store=dist.PrefixStore(f"evopress/{next(_GROUPS)}", store), rank=me,
                            world_size=world, timeout=_timeout())
    return True


def _first_gpu(local_rank: int, local_world: int, gpus: int) -> int:
    """A rank's own GPU: the first of its ``placement.gpu_share`` (where a --device-map replica starts),
    or GPU ``local_rank`` when the ranks do not split the GPUs evenly."""
    return local_rank * (gpus // local_world) if gpus >= local_world and gpus % local_world == 0 else local_rank


def local_device() -> str | None:
    """This rank's device in a group: its own GPU (nccl) or the CPU (gloo); None when not distributed."""
    if world_size() <= 1:
        return None
    return f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"


@contextmanager
def session() -> Iterator[None]:
    """One run's membership of the process group: joined here, and left at the end whatever happens.

    Reentrant: inside a group that is already joined (the CLI around ``evopress.run``, or a script
    that set up its own group) it joins nothing and leaves nothing. A failed collective becomes
    ``RankFailed``, one line, rather than a wall of gloo/nccl traces.
    """
    joined = _join()
    try:
        yield
    except (RuntimeError, OSError) as e:
        if world_size() <= 1 or isinstance(e, RankFailed):
            raise
        raise RankFailed(f"distributed run failed on this rank: {str(e).splitlines()[0]}") from e
    finally:
        if joined:
            dist.destroy_process_group()


def agree(values: Mapping[str, Any]) -> None:
    """Refuse to go on unless every rank holds the same ``values`` (what each made of its own arguments).

    A rank started with another seed or --out would silently score other candidates or write
    elsewhere; every rank raises the same UserError instead, naming the first setting that differs.
    """
    if world_size() <= 1:
        return
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, dict(values))
    for other, theirs in enumerate(gathered):
        if (difference := _first_difference(gathered[0], theirs)) is not None:
            name, ours, others = difference
            raise UserError(f"ranks disagree on {name}: rank 0 has {ours!r}, rank {other} has {others!r}; "
                            "start every rank with the same arguments")


def _first_difference(a: Any, b: Any, name: str = "") -> tuple[str, Any, Any] | None:
    """The first (dotted) key at which two nested mappings differ, and both values there."""
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return next((d for k in a if (d := _first_difference(a[k], b[k], f"{name}.{k}" if name else k))), None)
    return None if a == b else (name, a, b)


def from_main(read: Callable[[], T]) -> T:
    """``read()`` on rank 0 alone, its value handed to every rank; a UserError there is raised everywhere.

    For what only rank 0 may touch (--out: the lock, the checks, the checkpoint): all ranks continue
    from one value, and a mistake found there ends every rank with the same line, exit 2, instead of
    leaving the others waiting in their next collective.
    """
    if world_size() <= 1:
        return read()
    outcome: list[Any] = [None]
    if is_main():
        try:
            outcome[0] = read()
        except UserError as e:
            outcome[0] = e
    dist.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], UserError):
        raise outcome[0]
    return outcome[0]


def sharded(evaluator: Any) -> Any:
    """``evaluator`` with its candidates split between the ranks; itself in a single process."""
    return ShardedEvaluator(evaluator) if world_size() > 1 else evaluator


class ShardedEvaluator:
    """Wraps an Evaluator: each rank scores a contiguous share of the sorted candidates."""

    def __init__(self, evaluator: Any):
        self.inner = evaluator

    def sample(self, tokens: int, rng: Any) -> Any:
        return self.inner.sample(tokens, rng)

    def sample_tokens(self, sample: Any) -> int:
        return self.inner.sample_tokens(sample)

    def noise(self, a: Any, b: Any) -> float:
        return self.inner.noise(a, b)

    def score(self, configs: Sequence[Config], sample: Any) -> list[Any]:
        n, world, me = len(configs), world_size(), rank()
        order = sorted(range(n), key=lambda i: self.inner.space.block_keys(configs[i]))
        share = order[me * n // world: (me + 1) * n // world]
        mine = self.inner.score([configs[i] for i in share], sample) if share else []
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, list(zip(share, mine)))
        scores: list[Any] = [None] * n
        for part in gathered:
            for i, s in part:
                scores[i] = s
        return scores
