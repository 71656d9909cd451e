"""The table of docs/width.md from a benchmarks/width.sh run: every method at each budget.

    python benchmarks/width_table.py OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

from evopress.io import read_json

GENRES = ("code", "legal", "plays", "dialogue", "spanish")  # docs/generalization.md: no calibration text covers them
METHODS = (("EvoPress width", "width/target-*"), ("uniform width (OBS)", "width/baselines/uniform/target-*"),
           ("ShortGPT inside the width space", "width/baselines/shortgpt/target-*"),
           ("importance (activation, uniform)", "activation/target-*"), ("EvoPress depth", "depth/target-*"),
           ("ShortGPT depth", "depth/baselines/shortgpt/target-*"))


def row(name: str, d: Path) -> str:
    r, e = read_json(d / "result.json"), read_json(d / "eval.json")
    s = read_json(d / "speed.json") if (d / "speed.json").is_file() else None
    sets = e["datasets"]
    held = " | ".join(f"{sets[k]['kl']:.4f} ({sets[k]['ppl']:.2f})" for k in ("wiki", "ptb"))
    speed = f"x{s['prefill_speedup']:.2f} | x{s['decode_speedup']:.2f}" if s else "- | -"
    return (f"| {name} | {r['budget']['achieved']:.4f} | {r['fitness']['kl']:.4f} | {held} | {speed} | "
            f"{r.get('seconds', 0):.0f} |")


def main(out: Path) -> None:
    found = [(name, d) for name, pattern in METHODS for d in out.glob(pattern)
             if (d / "result.json").is_file() and (d / "eval.json").is_file()]
    budgets = sorted({round(float(d.name[7:]) * 20) / 20 for _, d in found})
    dense = read_json(out / "speed-dense.json") if (out / "speed-dense.json").is_file() else None
    if dense:
        print(f"dense model: prefill {dense['prefill_tokens_per_s']:.0f} tokens/s, decode "
              f"{dense['decode_tokens_per_s']:.1f} tokens/s ({dense['threads']} threads)\n")
    print("| method | linear params removed | calib KL | wiki KL (PPL) | PTB KL (PPL) | prefill speedup | "
          "decode speedup | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for budget in budgets:
        print(f"| **about {budget:.0%} removed** | | | | | | | |")
        for name, d in found:
            if round(float(d.name[7:]) * 20) / 20 == budget:
                print(row(name, d))
    genres = [(name, d, read_json(d / "eval.json")["datasets"]) for name, d in found]
    genres = [(name, d, sets) for name, d, sets in genres if all(g in sets for g in GENRES)]
    if genres:
        print(f"\nHeld-out genres (KL): | method | removed | {' | '.join(GENRES)} |")
        print("|---|---|" + "---|" * len(GENRES))
        for name, d, sets in genres:
            print(f"| {name} | {read_json(d / 'result.json')['budget']['achieved']:.4f} | "
                  + " | ".join(f"{sets[g]['kl']:.4f}" for g in GENRES) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
