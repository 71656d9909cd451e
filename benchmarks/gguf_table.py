"""The table of docs/gguf.md from a benchmarks/gguf.sh run: every method at every preset's size.

    python benchmarks/gguf_table.py OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

from evopress.io import read_json


def row(name: str, d: Path) -> str:
    r, e = read_json(d / "result.json"), read_json(d / "eval.json")
    rt = read_json(d / "runtime.json") if (d / "runtime.json").is_file() else {}
    b, sets = r["budget"], e["datasets"]
    held = " | ".join(f"{sets[s]['kl']:.4f} ({sets[s]['ppl']:.2f})" for s in ("wiki", "ptb"))
    runtime = f"{rt['agreement']:.3f} | {rt['tokens_per_s']:.1f}" if rt else "- | -"
    return (f"| {name} | {b['bytes']:,} | {b['bits_per_weight']:.4f} | {r['fitness']['kl']:.4f} | {held} | "
            f"{runtime} | {r.get('seconds', 0):.0f} |")


def main(out: Path) -> None:
    manifest = read_json(out / "db" / "manifest.json")
    names: dict[float, str] = {}  # presets of equal size (Q2_K and Q3_K_S on 576-wide rows) share a row
    for n, p in manifest["presets"].items():
        key = round(p["bits_per_weight"], 4)
        names[key] = f"{names[key]} = {n}" if key in names else n
    print(f"databases: {manifest['seconds']:.0f} s with imatrix, "
          f"{read_json(out / 'db-noimatrix' / 'manifest.json')['seconds']:.0f} s without\n")
    source = read_json(out / "runtime-source.json") if (out / "runtime-source.json").is_file() else None
    if source:
        print(f"source GGUF in llama.cpp vs the dense torch model: agreement {source['agreement']:.3f}, "
              f"{source['tokens_per_s']:.1f} tokens/s\n")
    print("| method | bytes | bits/weight | calib KL | wiki KL (PPL) | PTB KL (PPL) | llama.cpp agreement | "
          "tokens/s | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for d in sorted((out / "pareto").glob("target-*"), key=lambda p: float(p.name[7:])):
        t, target = d.name, read_json(d / "result.json")["target"]
        preset = names.get(round(target, 4), "?")
        plain = [p for p in (out / "noimatrix").glob("target-*") if abs(float(p.name[7:]) - target) < 1e-9]
        print(f"| **at {preset}'s size** | | | | | | | | |")
        for name, path in (("EvoPress", d), (f"{preset} (imatrix)", out / "pareto/baselines/preset" / t),
                           (f"{preset} (no imatrix)", plain[0] if plain else None),
                           ("uniform", out / "pareto/baselines/uniform" / t)):
            if path is not None and (path / "eval.json").is_file():
                print(row(name, path))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
