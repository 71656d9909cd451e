"""Where a search's host memory goes: RSS and peak RSS after each phase of one run, in one process.

    python benchmarks/memory_phases.py -- search --space quant --target 3 --db DB ... --out runs/x --restart

Runs ``evopress`` (the arguments after ``--``) in this process with read-only probes around its phases:
imports, model load, database open, calibration pool, teacher cache (``Evaluator.warm``), the first
``apply``, and every ``Evaluator.measure`` call (one per selection stage). Each line gives the
process's resident set (VmRSS), its peak so far (VmHWM), the wall time since the start, and the sizes
the evaluator's caches report (decoded levels, database variants, teacher entries). At the end it
also gives what glibc ``malloc_trim(0)`` hands back: memory freed by Python/torch but still held by
the allocator. ``benchmarks/host_memory.py`` gives the peaks alone, per space, against the issue's bound.
"""

from __future__ import annotations

import ctypes
import sys
import time

START = time.perf_counter()
CACHES: dict[str, object] = {}


def status() -> dict[str, int]:
    """VmRSS, VmHWM (KiB) of this process."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0])
    return out


def probe(label: str) -> None:
    s = status()
    sizes = []
    space, evaluator = CACHES.get("space"), CACHES.get("evaluator")
    if space is not None and hasattr(space, "_decoded"):
        sizes.append(f"decoded {space._decoded.bytes / 2**20:.0f}")
        sizes.append(f"variants {space._variants.bytes / 2**20:.0f}")
    if evaluator is not None:
        sizes.append(f"teacher {evaluator.teacher.nbytes / 2**20:.0f}")
    print(f"{time.perf_counter() - START:7.1f}s  {label:<28} rss {s['VmRSS'] / 1024:6.0f}  peak {s['VmHWM'] / 1024:6.0f}"
          f"  anon {s['RssAnon'] / 1024:6.0f}  file {s['RssFile'] / 1024:5.0f} MiB  {', '.join(sizes)}",
          file=sys.stderr, flush=True)


def wrap(owner: object, name: str, label: str, first_only: bool = False, keep: str | None = None) -> None:
    original = getattr(owner, name, None)
    if original is None:  # an older checkout without this phase
        return
    calls = [0]

    def probed(*args, **kwargs):
        result = original(*args, **kwargs)
        calls[0] += 1
        if keep is not None:
            CACHES[keep] = args[0]
        if not first_only or calls[0] == 1:
            probe(f"{label} #{calls[0]}" if not first_only else label)
        return result

    setattr(owner, name, probed)


def main() -> int:
    argv = sys.argv[1:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    probe("start")
    import evopress.cli as cli
    import evopress.fitness as fitness
    import evopress.models as models
    import evopress.pipeline as pipeline
    try:
        from evopress.spaces.layerwise import LayerwiseSpace
    except ImportError:  # an older checkout: no per-space probes
        LayerwiseSpace = None

    import transformers  # noqa: F401  (what a search imports anyway, counted here)

    probe("imports")
    wrap(getattr(models, "Hardware", None), "load", "model loaded", first_only=True)
    wrap(LayerwiseSpace, "__init__", "space + database open", first_only=True, keep="space")
    wrap(pipeline, "_calibration_pool", "calibration pool", first_only=True)
    wrap(fitness.Evaluator, "__init__", "evaluator", first_only=True, keep="evaluator")
    wrap(fitness.Evaluator, "warm", "teacher cache (warm)", first_only=True)
    wrap(LayerwiseSpace, "apply", "apply", first_only=True)
    wrap(fitness.Evaluator, "measure", "measure")
    rc = cli.main(argv)
    probe("end")
    peak = status()["VmHWM"]
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    probe("after malloc_trim(0)")
    print("peak_rss_kib", peak, file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
