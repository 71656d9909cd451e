"""Hold evopress.spaces.gguf.presets to a real llama-quantize output file.

Why: presets.py restates llama.cpp's preset rules; the strongest check is a GGUF that llama-quantize
actually wrote. This reads its header (no tensor data), predicts each weight tensor's type for the
given preset and prints every disagreement. Exit 1 if any.

llama.cpp before PR #9935 (merged 2024-11) visited tensors in the input file's order, which is
lexicographic (blk.0, blk.1, blk.10, ...) for safetensors-converted models, and the attn_v/ffn_down
counters followed it; such files are written in that same order. ``--visit-order file`` emulates them.

    python benchmarks/gguf_preset_check.py model-Q4_K_M.gguf Q4_K_M [--visit-order file]
"""

from __future__ import annotations

import argparse
import sys

from gguf import GGUFReader

from evopress.spaces.gguf.presets import KINDS, PRESETS, ModelShape, preset_types


def _kv(reader: GGUFReader, key: str) -> object:
    field = reader.fields[key]
    return field.contents() if hasattr(field, "contents") else field.parts[field.data[0]][0]


def _placed(name: str) -> bool:
    """The weight tensors presets.py places (norms, biases and others are left to the caller)."""
    return name in ("token_embd.weight", "output.weight") or (
        name.startswith("blk.") and name.endswith(".weight") and name.split(".")[2] in KINDS)


def _file_order_names(names: list[str]) -> dict[str, str]:
    """Rename blk.N so that layer order equals the order layers first appear in the file."""
    rank: dict[str, int] = {}
    for n in names:
        if n.startswith("blk."):
            rank.setdefault(n.split(".")[1], len(rank))
    return {n: (f"blk.{rank[n.split('.')[1]]}.{n.split('.', 2)[2]}" if n.startswith("blk.") else n) for n in names}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", help="GGUF written by llama-quantize")
    ap.add_argument("preset", choices=PRESETS)
    ap.add_argument("--visit-order", choices=("layer", "file"), default="layer",
                    help="layer: llama.cpp since 2024-11 (the followed commit); file: older llama-quantize")
    args = ap.parse_args()
    r = GGUFReader(args.gguf)
    arch = str(_kv(r, "general.architecture"))
    shape = ModelShape(arch, int(_kv(r, f"{arch}.block_count")), int(_kv(r, f"{arch}.attention.head_count")),
                       int(_kv(r, f"{arch}.attention.head_count_kv")))
    actual = {t.name: t.tensor_type.name for t in r.tensors if _placed(t.name)}
    ne0 = {t.name: int(t.shape[0]) for t in r.tensors}
    alias = _file_order_names(list(actual)) if args.visit_order == "file" else {n: n for n in actual}
    by_alias = preset_types(args.preset, [(alias[n], ne0[n]) for n in actual], shape)
    predicted = {n: by_alias[alias[n]] for n in actual}
    bad = [(n, predicted[n], actual[n]) for n in actual if predicted[n] != actual[n]]
    print(f"{args.gguf}: {shape}, {len(actual)} weight tensors, {len(bad)} mismatches")
    for name, want, got in bad:
        print(f"  {name}: predicted {want}, file has {got}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
