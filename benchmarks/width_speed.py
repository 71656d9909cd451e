"""Inference speed of the width benchmark's exports against the dense model, in plain transformers on CPU.

    echo -19 > /proc/self/autogroup; python benchmarks/width_speed.py OUT [--rounds 5] [--threads 2]

For every result of a benchmarks/width.sh run (the width search and its baselines, the depth search and
ShortGPT), ``evopress export`` writes the checkpoint once (``RESULT/export``); each is read with
``evopress.load_compressed`` (a plain checkpoint: ``from_pretrained``) and timed against the dense model:
prefill (one forward of a 256-token sequence, no cache) and decode (64 greedy tokens with the KV cache after
a 32-token prompt), both at batch 1, interleaved round by round so all share the same machine load; the
median round gives tokens/s. Writes ``RESULT/speed.json`` with the ratios to the dense model.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from pathlib import Path

import torch

import evopress
from evopress.io import write_json
from evopress.models import load_model

PREFILL, PROMPT, NEW = 256, 32, 64


def results(out: Path) -> list[Path]:
    patterns = ("width/target-*", "width/baselines/*/target-*", "activation/target-*", "depth/target-*",
                "depth/baselines/*/target-*")
    return sorted(d for p in patterns for d in out.glob(p) if (d / "result.json").is_file())


def timed(model: torch.nn.Module, ids: torch.Tensor, prompt: torch.Tensor) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of one round."""
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    prefill = ids.numel() / (time.perf_counter() - start)
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    return prefill, NEW / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dirs = results(args.out)
    for d in dirs:
        if not (d / "export" / "config.json").is_file():
            subprocess.run(["evopress", "export", str(d), "--out", str(d / "export")], check=True)
    models = {"dense": load_model(None, torch.device("cpu"), torch.float32).model}
    models.update({str(d): evopress.load_compressed(d / "export") for d in dirs})
    g = torch.Generator().manual_seed(0)
    ids, prompt = torch.randint(0, 49152, (1, PREFILL), generator=g), torch.randint(0, 49152, (1, PROMPT), generator=g)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            timed(model, ids, prompt)  # warm-up
        for _ in range(args.rounds):
            for name, model in models.items():
                runs[name].append(timed(model, ids, prompt))
    speed = {name: [statistics.median(r[i] for r in rs) for i in (0, 1)] for name, rs in runs.items()}
    dense = speed["dense"]
    write_json(args.out / "speed-dense.json", {"prefill_tokens_per_s": dense[0], "decode_tokens_per_s": dense[1],
                                               "threads": args.threads, "rounds": args.rounds})
    for d in dirs:
        s = speed[str(d)]
        params = sum(p.numel() for p in models[str(d)].parameters())
        write_json(d / "speed.json", {"prefill_tokens_per_s": s[0], "decode_tokens_per_s": s[1],
                                      "prefill_speedup": s[0] / dense[0], "decode_speedup": s[1] / dense[1],
                                      "parameters": params})
        print(f"{d}: prefill x{s[0] / dense[0]:.2f}, decode x{s[1] / dense[1]:.2f} ({params:,} parameters)")


if __name__ == "__main__":
    main()
