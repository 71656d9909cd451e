"""Searched or baseline quant profiles through llm-compressor's ``oneshot`` on the default model, on CPU.

    /work/venv-llmc/bin/python benchmarks/llmcompressor_quant.py RESULT_DIR [RESULT_DIR ...] --out runs/llmc-quant

(venv setup: ``benchmarks/llmcompressor_recipe.py``.) Each RESULT_DIR is a quant result on the default
model; all must hold the same per-layer bits (e.g. one profile from databases built with and without
act-order). Steps: ``evopress export`` writes each result's checkpoint and ``llmcompressor_recipe.yaml``;
``oneshot`` runs the first result's recipe (GPTQModifier, one config group per bitwidth) on the dense
default model once per ``--actorder`` value (``static``, ``null``: the recipe's ``actorder`` replaced;
``as-exported``: as written) with ``--calib-windows`` calibration windows of 256 tokens of ``--data``
(default: the same default as ``evopress build-db``; give the data the results' database was built on,
so both sides calibrate on the same text); the bits llm-compressor applied per layer are compared with
the profile, and every model is scored on the same held-out windows of each ``--eval-data`` text
(512 tokens, no BOS): perplexity and mean per-token KL(dense || model), ours loaded by
``evopress.load_compressed``, llm-compressor's as ``oneshot`` leaves it in memory (quantize-dequantize
forward). Writes ``compare.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

import evopress
from evopress.data import DEFAULT_CALIBRATION, load_pool
from evopress.io import read_json
from evopress.models import resolve_model_path
from evopress.pipeline import export_result


def scores(model: torch.nn.Module, dense_logp: list[torch.Tensor], windows: torch.Tensor) -> dict[str, float]:
    nll = kl = 0.0
    count = 0
    with torch.inference_mode():
        for ids, teacher in zip(windows.split(4), dense_logp):
            logp = F.log_softmax(model(input_ids=ids, use_cache=False).logits[:, :-1].double(), dim=-1)
            nll -= logp.gather(-1, ids[:, 1:, None]).sum().item()
            kl += (teacher.exp() * (teacher - logp)).sum().item()
            count += ids[:, 1:].numel()
    return {"ppl": round(math.exp(nll / count), 3), "kl": round(kl / count, 5)}


def reference(dense: torch.nn.Module, tokenizer, texts: list[str], windows: int):
    """A scorer of any model on the held-out windows of ``texts`` against ``dense`` (its log-probs kept)."""
    held_out = {t: load_pool(tokenizer, t, "evaluation", 512, windows * 512).windows for t in texts}
    with torch.inference_mode():
        dense_logp = {t: [F.log_softmax(dense(input_ids=ids, use_cache=False).logits[:, :-1].double(), dim=-1)
                          for ids in w.split(4)] for t, w in held_out.items()}

    def score_all(model: torch.nn.Module) -> dict[str, dict[str, float]]:
        return {t: scores(model, dense_logp[t], held_out[t]) for t in texts}

    return score_all


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", default=DEFAULT_CALIBRATION, help="oneshot's calibration text: wiki, ptb, "
                        "a file or a+b, as evopress --data (default: %(default)s, evopress's default)")
    parser.add_argument("--eval-data", default="wiki,ptb", help="held-out texts, comma-separated (default: "
                        "%(default)s)")
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--actorder", default="as-exported", help="comma-separated: static, null, as-exported")
    args = parser.parse_args()
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exports, profiles = [], []
    for result in args.results:
        ours = args.out / f"evopress-{result.name}"
        export_result(result, ours, log=lambda m: None)
        exports.append(ours)
        profiles.append(read_json(ours / "evopress_profile.json")["layer_bits"])
    if any(p != profiles[0] for p in profiles):
        raise SystemExit("the results hold different per-layer bits; compare one profile at a time")
    profile = profiles[0]
    _, dense_path = resolve_model_path(None)
    tokenizer = AutoTokenizer.from_pretrained(dense_path)
    calib = load_pool(tokenizer, args.data, "calibration", 256, args.calib_windows * 256).windows
    texts = [t for t in args.eval_data.split(",") if t]
    dense = AutoModelForCausalLM.from_pretrained(dense_path, dtype=torch.float32).eval()
    score_all = reference(dense, tokenizer, texts, args.eval_windows)

    report = {"results": [str(r) for r in args.results],
              "database": [_db_settings(r) for r in args.results],
              "oneshot_data": args.data, "calib_windows": args.calib_windows, "eval_data": texts,
              "eval_tokens_each": args.eval_windows * 512, "dense": score_all(dense),
              "evopress": {r.name: score_all(evopress.load_compressed(e)) for r, e in zip(args.results, exports)},
              "llmcompressor": {}}
    for order in [o for o in args.actorder.split(",") if o]:
        recipe = yaml.safe_load((exports[0] / "llmcompressor_recipe.yaml").read_text())
        gptq = recipe["quant_stage"]["quant_modifiers"]["GPTQModifier"]
        if order != "as-exported":
            gptq["actorder"] = None if order == "null" else order
        path = args.out / f"recipe-{order}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        model = AutoModelForCausalLM.from_pretrained(dense_path, dtype=torch.float32)
        data = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
        start = time.perf_counter()
        oneshot(model=model, dataset=data, recipe=str(path), num_calibration_samples=len(calib), max_seq_length=256,
                processor=tokenizer)
        applied = {n: m.quantization_scheme.weights.num_bits for n, m in model.named_modules()
                   if getattr(m, "quantization_scheme", None) is not None}
        report["llmcompressor"][order] = {
            "actorder": gptq.get("actorder"), "oneshot_seconds": round(time.perf_counter() - start, 1),
            "bits_equal_profile": applied == profile, **score_all(model.eval())}
        (args.out / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


def _db_settings(result: Path) -> dict:
    db = Path(read_json(result / "result.json")["space_options"]["db"])
    manifest = read_json(db / "manifest.json")
    settings = {k: manifest.get(k) for k in ("data", "act_order", "symmetric", "bits", "group_size", "calib_bits")}
    return {"db": str(db), **settings, "calibration_tokens": manifest["calibration"]["tokens"]}


if __name__ == "__main__":
    main()
