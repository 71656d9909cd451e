"""Host memory: handing back to the OS what a run no longer needs but would otherwise keep resident.

Why its own concern: on a CPU model everything (the model, the database and teacher caches, every
temporary) is host RAM, and two kinds of memory stay counted after their tensors are gone: pages of
a memory-mapped checkpoint whose tensor was replaced (the mapping lives on for the other tensors), and
heap that glibc keeps after a phase of many mid-sized temporaries (tokenizing the calibration text,
the teacher's pass). Neither changes any value.
"""

from __future__ import annotations

import ctypes
import functools
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

_MADV_DONTNEED = 4
_M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
MMAP_THRESHOLD = 4 << 20  # temporaries below it are reused from the heap, larger ones mapped
LONG_LIVED_THRESHOLD = 128 << 10  # glibc's own starting value: what outlives the temporaries is mapped
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_held: int | None = None  # the threshold map_large_allocations set, None if it set none


def release_file_pages(tensor: torch.Tensor) -> bool:
    """Unmap the pages of a CPU tensor that views a memory-mapped file, once it is no longer needed.

    Why: a model loaded on the CPU views its safetensors file, and that one mapping lives as long as any
    of its tensors (the embeddings: for the whole run). A layer whose dense weight was replaced by a
    level would otherwise keep the dense pages resident next to the level, counting the layer twice.
    The pages stay in the page cache and the mapping stays valid (a later read faults them back in
    from the file), so this changes memory use, never values. Anonymous memory (a copy, a model built
    in code) is left alone: only whole pages inside a file mapping are released. Returns whether any were.
    """
    if tensor.device.type != "cpu" or tensor.numel() == 0 or not hasattr(os, "sysconf"):
        return False
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE
    if last <= first or not _file_mapped(first, last):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED) == 0


def _file_mapped(first: int, last: int) -> bool:
    """Whether [first, last) lies inside one mapping of a regular file (``/proc/self/maps``)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= first and last <= hi:
            path = fields[5] if len(fields) > 5 else ""
            return path.startswith("/") and not path.endswith("(deleted)") and Path(path).is_file()
    return False


def trim_heap() -> None:
    """Return the free memory glibc holds at the top of its heaps to the OS (``malloc_trim(0)``), after a
    phase whose temporaries were freed (tokenizing leaves hundreds of MiB there: docs/scaling.md); a
    no-op elsewhere."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def map_large_allocations(threshold: int = MMAP_THRESHOLD) -> bool:
    """Hold glibc's mmap threshold at ``threshold``: host allocations of that size or more get their own
    mapping, returned to the OS when freed; True if set.

    Why: glibc raises its mmap threshold (up to 32 MiB) each time a mapped block is freed, so after the
    first large temporary a model's activations and logit blocks come from the heap, which fragments
    and stays resident. A fixed threshold bounds that; together with ``long_lived`` (below) it can sit
    above the small, frequent temporaries, which the heap then reuses without a page fault each time.
    The trade of memory against system time is measured in docs/scaling.md.
    A user's own ``MALLOC_MMAP_THRESHOLD_`` (read by glibc at start) is left alone; a no-op off glibc.
    """
    global _held
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    if not _set_threshold(threshold):
        return False
    _held = threshold
    return True


@contextmanager
def long_lived() -> Iterator[None]:
    """Allocations made inside get their own mappings: for tensors that outlive the temporaries around
    them (levels put into layers and the database cache entries they come from, the teacher cache, a
    stage's targets and block inputs).

    Why: in the heap, one such tensor among freed temporaries pins the pages around it, and the heap
    grows with every candidate that rewrites a layer; mapped, it is returned whole when freed. Only
    while ``map_large_allocations`` holds a threshold (else glibc's own policy stands)."""
    held = _held
    if held is None or held <= LONG_LIVED_THRESHOLD:
        yield
        return
    _set_threshold(LONG_LIVED_THRESHOLD)
    try:
        yield
    finally:
        _set_threshold(held)


def _set_threshold(threshold: int) -> bool:
    libc = _glibc()
    return libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, threshold) == 1


@functools.lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    """glibc (``mallopt``, ``malloc_trim``), or None elsewhere (musl, macOS): loaded once per process, as
    ``long_lived`` calls it per candidate."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
