"""What evopress's hold on glibc's mmap threshold costs in speed, and saves in memory, on one search.

    python benchmarks/mmap_threshold.py --out runs/mmap --db runs/memory/db-fixed-quant --space quant --target 3

Runs the same short search in fresh processes, alternating the ``--modes``, ``--repeats`` times each:
``held`` (what evopress does: ``hostmem.map_large_allocations`` when the model loads: temporaries of
4 MiB or more mapped, long-lived tensors always mapped), ``glibc`` (that call skipped: glibc's own
threshold, which rises to the size of each freed mapping, up to 32 MiB), or ``BYTES``: the threshold
held at that many bytes (131072: every allocation of 128 KiB or more mapped, the previous default).
Each run reports the search's own seconds per generation (result.json history), its total seconds, the
process's user and system CPU seconds (system time is where page faults land) and its peak RSS.
Alternating the modes spreads a shared machine's load over them; compare the medians within one
invocation. Results append to ``OUT/mmap.tsv``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

# runs evopress in this process, optionally without the fixed threshold, and prints the peak RSS
RUNNER = """
import resource, sys
import evopress.hostmem as hostmem
import evopress.models as models
mode = sys.argv[1]
if mode == "glibc":
    models.map_large_allocations = lambda *a, **k: False
elif mode != "held":  # another threshold, in bytes
    models.map_large_allocations = lambda: hostmem.map_large_allocations(int(mode))
import evopress.cli as cli
rc = cli.main(sys.argv[2:])
usage = resource.getrusage(resource.RUSAGE_SELF)
print("peak_rss_kib", usage.ru_maxrss, "user_s", usage.ru_utime, "sys_s", usage.ru_stime, file=sys.stderr)
sys.exit(rc)
"""
SCHEDULE = ["--seq-len", "256", "--calib-tokens", "8192", "--generations", "4", "--offspring", "8",
            "--stages", "2:256,1:1024", "--final-tokens", "1024", "--quiet", "--init-from", "none"]


def run(mode: str, args: argparse.Namespace, out: Path) -> dict[str, float]:
    db = ["--db", str(args.db)] if args.db else []
    cmd = [sys.executable, "-c", RUNNER, mode, "search", "--space", args.space, "--target", args.target, *db,
           *SCHEDULE, "--out", str(out), "--restart"]
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    proc = subprocess.run(cmd, env={**env, "PYTHONPATH": args.src}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    result = json.loads((out / "result.json").read_text())
    generations = [h["seconds"] for h in result["history"]]
    fields = proc.stderr.split("peak_rss_kib")[-1].split()
    return {"gen_s": statistics.median(generations), "total_s": result["seconds"],
            "user_s": float(fields[2]), "sys_s": float(fields[4]), "peak_mib": int(fields[0]) / 2**10}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--space", default="quant")
    p.add_argument("--target", default="3")
    p.add_argument("--db", type=Path, help="the level database of a sparsity or quant search")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--modes", default="held,glibc",
                   help="held (evopress's default), glibc (its moving threshold), or BYTES held")
    p.add_argument("--src", default=str(Path(__file__).resolve().parents[1] / "src"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict[str, float]]] = {mode: [] for mode in args.modes.split(",")}
    for r in range(args.repeats):
        for mode in rows:
            rows[mode].append(run(mode, args, args.out / f"{args.space}-{mode}-{r}"))
            print(f"{mode} #{r}: {rows[mode][-1]}", flush=True)
    table = args.out / "mmap.tsv"
    new = not table.is_file()
    with open(table, "a") as f:
        if new:
            f.write("space\tmode\truns\tmedian_generation_s\tmedian_total_s\tmedian_user_cpu_s\t"
                    "median_system_cpu_s\tmedian_peak_rss_mib\n")
        for mode, runs in rows.items():
            med = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
            f.write(f"{args.space}\t{mode}\t{len(runs)}\t{med['gen_s']:.2f}\t{med['total_s']:.1f}\t"
                    f"{med['user_s']:.1f}\t{med['sys_s']:.1f}\t{med['peak_mib']:.0f}\n")
            print(f"{args.space} {mode}: median s/generation {med['gen_s']:.2f}, total {med['total_s']:.1f} s, "
                  f"CPU user {med['user_s']:.1f} s + system {med['sys_s']:.1f} s, peak RSS {med['peak_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
