"""Peak host RSS of a sparsity and a quant search on the default model, against the issue's bound.

    python benchmarks/host_memory.py --out runs/memory                     # this checkout
    python benchmarks/host_memory.py --out runs/memory --src OLD/src --label before   # another checkout
    python benchmarks/host_memory.py --out runs/memory --model DIR --label 1b  # another model (random_model.py)

Builds small level databases with the measured checkout once (sparsity ±2 levels around 50%, quant
2,3,4 bits; reused by later runs with the same label), then runs a short search per space in a fresh
process (``memory_phases.py``) that logs its RSS after every phase to ``OUT/LABEL-SPACE.phases`` and
its peak RSS (VmHWM) at exit. The bound is model bytes + database cache + teacher cache + 25%, where the
database cache is what the search can hold (min of ``$EVOPRESS_DB_CACHE_GB`` and the database on disk)
and the teacher cache is ``pool tokens x (hidden + 2) x 4`` bytes. The bound lists the search's data, not
the runtime that holds it (Python, torch, transformers, the model's code and its tokenizer: about 0.4 GB
whatever the model's size), so the peak is also given above the runtime's own RSS, measured in a process
that imports all of it and builds the model on the meta device. Results append to ``OUT/memory.tsv``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CALIB = ["--seq-len", "256", "--calib-tokens", "8192"]
# --init-from '': random start only, what every checkout (--src) does with it (older ones know no 'none')
SEARCH = ["--generations", "2", "--offspring", "8", "--stages", "2:256,1:1024", "--final-tokens", "1024", "--quiet",
          "--init-from", ""]
# --target is build-db's older name for --center, so older checkouts run the same command
SPACES = {"sparsity": (["--target", "0.5", "--levels", "2"], "0.5"), "quant": (["--bits", "2,3,4"], "3")}
PHASES = str(Path(__file__).resolve().parent / "memory_phases.py")  # runs evopress, logs RSS per phase and the peak


def evopress(args: list[str], src: str) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": src}
    proc = subprocess.run([sys.executable, PHASES, *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    return proc.returncode, proc.stderr


RUNTIME = """
import resource, torch, transformers, evopress.cli, evopress.pipeline
from evopress.models import Hardware, resolve_model_path
imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
path = resolve_model_path(MODEL)[1]
transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
with torch.device("meta"):  # imports the model's code, allocates no weights
    transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(path))
runtime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
m = Hardware("cpu").load(MODEL).model
print(sum(p.numel() * p.element_size() for p in m.parameters()), m.config.hidden_size, imports, runtime)
"""


def model_bytes(src: str, model: str | None) -> tuple[int, int, int, int]:
    """Parameter bytes and hidden size of the model; the peak RSS of the imports alone, and of the
    runtime: the imports plus the model's code and its tokenizer, with no weight or data loaded."""
    code = f"MODEL = {model!r}\n{RUNTIME}"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": src},
                         capture_output=True, text=True, check=True).stdout.split()
    return int(out[0]), int(out[1]), int(out[2]), int(out[3])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--src", default=str(Path(__file__).resolve().parents[1] / "src"))
    p.add_argument("--label", default="after")
    p.add_argument("--spaces", default=",".join(SPACES), help="which of %(default)s to measure")
    p.add_argument("--model", default=None, help="local HF model directory (default: the embedded model)")
    args = p.parse_args()
    here = str(Path(__file__).resolve().parents[1] / "src")
    weights, hidden, imports, runtime = model_bytes(here, args.model)
    model = ["--model", str(Path(args.model).resolve())] if args.model else []
    cache_gb = float(os.environ.get("EVOPRESS_DB_CACHE_GB", "8"))
    rows = []
    for space in args.spaces.split(","):
        build, target = SPACES[space]
        db = args.out / f"db-{args.label}-{space}"
        if not (db / "manifest.json").is_file():
            evopress(["build-db", *model, "--space", space, *build, *CALIB, "--out", str(db), "--quiet"], args.src)
        db_bytes = json.loads((db / "manifest.json").read_text())["bytes"]
        run = args.out / f"{args.label}-{space}"
        _, err = evopress(["search", *model, "--space", space, "--target", target, "--db", str(db), *CALIB, *SEARCH,
                           "--out", str(run), "--restart"], args.src)
        (args.out / f"{args.label}-{space}.phases").write_text(err)
        peak = int(err.split("peak_rss_kib")[-1].split()[0]) * 1024
        teacher = 8192 * (hidden + 2) * 4
        bound = 1.25 * (weights + min(db_bytes, cache_gb * 2**30) + teacher)
        data = peak - runtime
        rows.append([args.label, space, peak, weights, db_bytes, teacher, imports, int(bound), peak <= bound,
                     runtime, data, data <= bound])
        print(f"{args.label} {space}: peak RSS {peak / 2**20:.0f} MiB; bound {bound / 2**20:.0f} MiB (model "
              f"{weights / 2**20:.0f} + database {db_bytes / 2**20:.0f} + teacher {teacher / 2**20:.0f}, +25%): "
              f"{'within' if peak <= bound else 'ABOVE'}; the imports alone: {imports / 2**20:.0f} MiB, the runtime "
              f"(imports, model code, tokenizer): {runtime / 2**20:.0f} MiB; peak above the runtime "
              f"{data / 2**20:.0f} MiB: {'within' if data <= bound else 'ABOVE'} the bound")
    table = args.out / "memory.tsv"
    header = ("label\tspace\tpeak_rss\tmodel_bytes\tdb_bytes\tteacher_bytes\timports_rss\tbound\twithin"
              "\truntime_rss\tabove_runtime\tabove_runtime_within\n")
    if table.is_file() and table.read_text().split("\n", 1)[0] + "\n" != header:  # an older table's columns
        table.rename(table.with_suffix(".old.tsv"))
    new = not table.is_file()
    with open(table, "a") as f:
        if new:
            f.write(header)
        for row in rows:
            f.write("\t".join(map(str, row)) + "\n")


if __name__ == "__main__":
    main()
