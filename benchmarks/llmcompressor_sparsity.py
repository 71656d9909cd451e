"""Uniform SparseGPT: our database's level against llm-compressor's ``SparseGPTModifier``, on CPU.

    /work/venv-llmc/bin/python benchmarks/llmcompressor_sparsity.py RESULT_DIR [RESULT_DIR ...] --out DIR

(venv setup: ``benchmarks/llmcompressor_recipe.py``.) Each RESULT_DIR is a sparsity result on the
default model at one uniform sparsity (e.g. ``evopress baseline --method uniform`` on a database built
with ``--levels 0`` at that centre, and its ``evopress finalize``); all must share one target. ``evopress
export`` writes each (a plain checkpoint with exact zeros); ``oneshot`` runs ``SparseGPTModifier`` at
that sparsity (unstructured, every linear layer of the blocks, block size 128, dampening 0.01, as our
database) on ``--calib-windows`` windows of 256 tokens of ``--data`` (give the results' calibration text);
every model is scored on the held-out windows of each ``--eval-data`` text (512 tokens, no BOS):
perplexity and mean per-token KL(dense || model), and the achieved sparsity of each is checked.
Writes ``compare.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llmcompressor_quant import reference  # noqa: E402

from evopress.data import DEFAULT_CALIBRATION, load_pool  # noqa: E402
from evopress.io import read_json  # noqa: E402
from evopress.models import resolve_model_path  # noqa: E402
from evopress.pipeline import export_result  # noqa: E402


def sparsity(model: torch.nn.Module) -> float:
    """Fraction of zeros over the blocks' linear weights."""
    weights = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", default=DEFAULT_CALIBRATION)
    parser.add_argument("--eval-data", default="wiki,ptb")
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=8)
    args = parser.parse_args()
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier

    targets = {read_json(r / "result.json")["target"] for r in args.results}
    if len(targets) != 1:
        raise SystemExit(f"the results hold different targets {sorted(targets)}; compare one sparsity at a time")
    target = targets.pop()
    _, dense_path = resolve_model_path(None)
    tokenizer = AutoTokenizer.from_pretrained(dense_path)
    texts = [t for t in args.eval_data.split(",") if t]
    dense = AutoModelForCausalLM.from_pretrained(dense_path, dtype=torch.float32).eval()
    score_all = reference(dense, tokenizer, texts, args.eval_windows)
    report = {"target": target, "oneshot_data": args.data, "calib_windows": args.calib_windows, "eval_data": texts,
              "eval_tokens_each": args.eval_windows * 512, "dense": score_all(dense), "evopress": {}}
    for result in args.results:
        ours = args.out / f"evopress-{result.name}"
        export_result(result, ours, log=lambda m: None)
        model = AutoModelForCausalLM.from_pretrained(ours, dtype=torch.float32).eval()
        report["evopress"][result.name] = {"sparsity": round(sparsity(model), 6), **score_all(model)}
    calib = load_pool(tokenizer, args.data, "calibration", 256, args.calib_windows * 256).windows
    data = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    model = AutoModelForCausalLM.from_pretrained(dense_path, dtype=torch.float32)
    modifier = SparseGPTModifier(sparsity=target, mask_structure="0:0", block_size=128, dampening_frac=0.01,
                                 targets=["Linear"], ignore=["lm_head"])
    start = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=modifier, num_calibration_samples=len(calib), max_seq_length=256,
            processor=tokenizer)
    report["llmcompressor"] = {"oneshot_seconds": round(time.perf_counter() - start, 1),
                               "sparsity": round(sparsity(model), 6), **score_all(model.eval())}
    (args.out / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
