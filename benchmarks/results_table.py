"""The README's headline Results table from `evopress pareto` runs (benchmarks/results.sh).

    python benchmarks/results_table.py runs/results/depth/front.json runs/results/quant/front.json ...

Reads each run's front.json (held-out PPL and KL per method and budget, the dense model's) and each
point's result.json (achieved budget, search generations), and prints one markdown table: a row per
space, budget and method, EvoPress first, the best value of each budget's column in bold. A line under
the table gives the dense model's held-out perplexities and any baseline a budget skipped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SPACE = {"drop": "depth", "sparsity": "sparsity", "quant": "quant"}
METHOD = {"evopress": "**EvoPress**", "shortgpt": "ShortGPT", "angular": "angular", "random": "random",
          "uniform": "uniform", "owl": "OWL", "dp": "DP"}


def budget(space: str, target: float) -> str:
    if space == "drop":
        return f"{100 * target:g}% sub-blocks"
    if space == "sparsity":
        return f"{100 * target:g}%"
    return f"{target:.1f} bits"


def rows(front: dict, sets: list[str]) -> tuple[list[str], list[str]]:
    space = front["space"]
    out, notes = [], []
    for target in front["targets"]:
        points = [(m, p) for m, ps in front["methods"].items() for p in ps if p["target"] == target]
        points.sort(key=lambda mp: (mp[0] != "evopress", mp[1]["held_out"][sets[0]]["kl"]))
        best = {(s, k): min(p["held_out"][s][k] for _, p in points) for s in sets for k in ("ppl", "kl")}
        best_calib = min(p["calibration_kl"] for _, p in points)
        for method, p in points:
            calib = f"{p['calibration_kl']:.4f}"
            cells = [f"{SPACE.get(space, space)}, {budget(space, target)}", METHOD.get(method, method),
                     f"**{calib}**" if p["calibration_kl"] == best_calib else calib]
            for s in sets:
                for key, fmt in (("ppl", "{:,.2f}"), ("kl", "{:.4f}")):
                    v = p["held_out"][s][key]
                    text = fmt.format(v)
                    cells.append(f"**{text}**" if v == best[(s, key)] else text)
            out.append("| " + " | ".join(cells) + " |")
        for method, skipped in front.get("skipped", {}).items():
            notes += [f"{METHOD.get(method, method)} skipped at {budget(space, s['target'])}: {s['reason']}"
                      for s in skipped if s["target"] == target]
    return out, notes


def generations(front: dict) -> str:
    gens = set()
    for p in front["methods"].get("evopress", []):
        result = json.loads((Path(p["dir"]) / "result.json").read_text())
        gens.add(result["recipe"]["search"]["generations"])
    return "/".join(str(g) for g in sorted(gens))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fronts", type=Path, nargs="+", help="front.json files of evopress pareto runs")
    args = ap.parse_args()
    fronts = [json.loads(f.read_text()) for f in args.fronts]
    sets = fronts[0]["eval"]["data"]
    names = {"wiki": "wiki", "ptb": "PTB"}
    head = ["space, budget", "method", "calib KL"] + [f"{names.get(s, s)} {k}" for s in sets for k in ("PPL", "KL")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for front in fronts:
        if front["eval"]["data"] != sets:
            raise SystemExit(f"{front['space']}: evaluated on {front['eval']['data']}, not {sets}")
        r, n = rows(front, sets)
        lines += r
        notes += n
    dense = fronts[0]["dense"]["held_out"]
    tokens = fronts[0]["eval"]["tokens"]
    print("\n".join(lines))
    print()
    print("Dense: " + ", ".join(f"{names.get(s, s)} PPL {dense[s]['ppl']:.2f}" for s in sets)
          + f"; held-out {tokens:,} tokens per set in {fronts[0]['eval']['seq_len']}-token windows. "
          + "EvoPress generations: " + ", ".join(f"{SPACE.get(f['space'], f['space'])} {generations(f)}"
                                                for f in fronts) + ".")
    for note in notes:
        print(f"- {note}")


if __name__ == "__main__":
    main()
