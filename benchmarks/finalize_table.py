"""Stitched vs finalized results as one markdown table (benchmarks/finalize.sh).

    python benchmarks/finalize_table.py RESULTS OUT

Pairs every result under OUT (finalized) with the result it came from (``finalized.from``) and prints,
per space, budget and method: held-out PPL and KL of both on each evaluated text, and each one's rank
within its budget (by the first text's KL; equal KL, equal rank), so whether EvoPress's advantage survives is
read off directly.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    rows = []
    for result in sorted(args.out.rglob("result.json")):
        final = load(result)
        if not (result.parent / "eval.json").is_file():
            continue
        source = Path(final["finalized"]["from"])
        rows.append((final["space"], final["target"], final["method"], load(source / "eval.json"),
                     load(result.parent / "eval.json")))
    sets = list(rows[0][3]["datasets"]) if rows else []
    head = ["space", "budget", "method"] + [f"{s} {k} {kind}" for s in sets for k in ("PPL", "KL")
                                           for kind in ("stitched", "finalized")] + ["rank stitched", "rank finalized"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for space, target in sorted({(r[0], r[1]) for r in rows}):
        budget = [r for r in rows if (r[0], r[1]) == (space, target)]
        kl = [{r[2]: r[k]["datasets"][sets[0]]["kl"] for r in budget} for k in (3, 4)]  # stitched, finalized
        ranks = [{m: 1 + sum(v < mine for v in by.values()) for m, mine in by.items()} for by in kl]  # ties share
        for _, _, method, stitched, finalized in sorted(budget, key=lambda r: r[2] != "evopress"):
            cells = [space, f"{target:g}", method]
            for s in sets:
                for key, fmt in (("ppl", "{:,.2f}"), ("kl", "{:.4f}")):
                    cells += [fmt.format(e["datasets"][s][key]) for e in (stitched, finalized)]
            cells += [str(ranks[0][method]), str(ranks[1][method])]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
