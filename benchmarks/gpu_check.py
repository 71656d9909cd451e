"""GPU check: short depth, sparsity, quant and width searches of the default model in bf16 on CUDA.

    bash benchmarks/gpu_check.sh [OUT]        # needs a CUDA device; no network

Per space it prints candidate-tokens per second of the search, peak device memory, and the fitness of
the same candidates (the search's result and a few random configurations) measured with the model in
bf16 and in fp32 on one shared sample: the difference is the precision cost of searching in bf16.
Not part of the test suite (CI has no GPU).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from evopress.cli import main as cli
from evopress.pipeline import prepare
from evopress.recipe import make_recipe

SPACES = {"drop": ([], "0.25"), "sparsity": (["--center", "0.5", "--levels", "2"], "0.5"),
          "quant": (["--bits", "2,3,4"], "3"), "width": (["--method", "obs"], "0.25")}
SIZES = {  # seq_len, pool, stages, final and comparison tokens, offspring, generations
    "full": (512, 32768, "4:2048,1:8192", 8192, 32, 5),
    "quick": (32, 512, "2:32,1:64", 128, 4, 2),  # a smoke test of this script on CPU with a tiny --model
}


def fitness_pair(args: argparse.Namespace, space: str, target: float, options: dict, configs: list,
                 seed: int = 0) -> list[tuple[float, float]]:
    """KL of each configuration with the model in bf16 and in fp32, on one shared sample."""
    seq_len, pool, stages, tokens, _, _ = SIZES[args.size]
    scores = []
    for dtype in ("bfloat16", "float32"):
        recipe = make_recipe(space=space, target=target, space_options=options, model=args.model, data=args.data,
                             device=args.device, dtype=dtype, seq_len=seq_len, calib_tokens=pool, init_from="none",
                             final_tokens=tokens, stages=[tuple(map(int, s.split(":"))) for s in stages.split(",")])
        ctx = prepare(recipe, log=lambda m: None)
        sample = ctx.pool.sample(tokens, np.random.default_rng(seed))
        scores.append([m.kl for m in ctx.evaluator.measure(configs, sample)])
        del ctx
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return list(zip(*scores))


def check(args: argparse.Namespace, space: str) -> dict:
    build, target = SPACES[space]
    seq_len, pool, stages, tokens, offspring, generations = SIZES[args.size]
    common = ["--seq-len", str(seq_len), "--calib-tokens", str(pool), "--device", args.device,
              "--dtype", "bfloat16", "--data", args.data, *(["--model", args.model] if args.model else [])]
    db = args.out / f"db-{space}"
    options = []
    if build:
        if not (db / "manifest.json").is_file():
            start = time.perf_counter()
            assert cli(["build-db", "--space", space, *build, *common, "--out", str(db), "--quiet"]) == 0
            print(f"{space}: database built in {time.perf_counter() - start:.0f} s")
        options = ["--db", str(db)]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run = args.out / f"search-{space}"
    assert cli(["search", "--space", space, "--target", target, *options, *common, "--generations", str(generations),
                "--offspring", str(offspring), "--stages", stages, "--final-tokens", str(tokens), "--init-from", "none",
                "--restart",
                "--quiet", "--out", str(run)]) == 0
    result = json.loads((run / "result.json").read_text())
    gens = [h for h in result["history"] if h["generation"] > 0]
    rate = sum(h["tokens"] for h in gens) / sum(h["seconds"] for h in gens)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    ctx = prepare(make_recipe(result["recipe"]), log=lambda m: None)
    configs = [ctx.space.from_model_levels(tuple(result["levels"])),
               *ctx.space.random_configs(np.random.default_rng(1), 3)]
    del ctx
    pairs = fitness_pair(args, space, float(target), result["space_options"], configs)
    row = {"space": space, "candidate_tokens_per_s": round(rate), "peak_device_gib": round(peak, 2),
           "kl_bf16_fp32": [[round(a, 6), round(b, 6)] for a, b in pairs],
           "max_abs_diff": max(abs(a - b) for a, b in pairs)}
    print(json.dumps(row))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/gpu-check"))
    p.add_argument("--spaces", default=",".join(SPACES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    p.add_argument("--data", default="wiki")
    p.add_argument("--size", choices=list(SIZES), default="full")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device (or --device cpu --size quick for a smoke test)")
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device: {name}; torch {torch.__version__}")
    rows = [check(args, space) for space in args.spaces.split(",")]
    (args.out / "gpu_check.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
