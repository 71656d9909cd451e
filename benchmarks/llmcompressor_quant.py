"""A searched quant profile through llm-compressor's ``oneshot`` on the default model, on CPU.

    /work/venv-llmc/bin/python benchmarks/llmcompressor_quant.py RESULT_DIR --out runs/llmc-quant

(venv setup: ``benchmarks/llmcompressor_recipe.py``.) RESULT_DIR is a quant search result on the
default model. Steps: ``evopress export`` writes our checkpoint and ``llmcompressor_recipe.yaml``;
``oneshot`` runs that recipe (GPTQModifier, one config group per bitwidth) on the dense default model
with ``--calib-windows`` calibration windows of 256 tokens of ``--data`` (default: the same default
as ``evopress build-db``, the ``wiki+ptb`` mix; give the data the RESULT's database was built on, so
both sides calibrate on the same text); then the bits llm-compressor applied per layer are compared
with the profile, and both models are scored on the same held-out windows of ``--eval-data`` (default
the Wikipedia evaluation split; 512 tokens, no BOS):
perplexity and mean per-token KL(dense || model), ours loaded by ``evopress.load_compressed``,
llm-compressor's as ``oneshot`` leaves it in memory (quantize-dequantize forward).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("result", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", default=DEFAULT_CALIBRATION, help="oneshot's calibration text: wiki, ptb, "
                        "a file or a+b, as evopress --data (default: %(default)s, evopress's default)")
    parser.add_argument("--eval-data", default="wiki", help="held-out text (default: %(default)s)")
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=8)
    args = parser.parse_args()
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours_dir = args.out / "evopress-export"
    export_result(args.result, ours_dir, log=lambda m: None)
    profile = read_json(ours_dir / "evopress_profile.json")["layer_bits"]
    _, dense_path = resolve_model_path(None)
    tokenizer = AutoTokenizer.from_pretrained(dense_path)
    calib = load_pool(tokenizer, args.data, "calibration", 256, args.calib_windows * 256).windows
    held_out = load_pool(tokenizer, args.eval_data, "evaluation", 512, args.eval_windows * 512).windows
    dense = AutoModelForCausalLM.from_pretrained(dense_path, dtype=torch.float32).eval()
    with torch.inference_mode():
        dense_logp = [F.log_softmax(dense(input_ids=ids, use_cache=False).logits[:, :-1].double(), dim=-1)
                      for ids in held_out.split(4)]
    report = {"result": str(args.result), "database_data": read_json(args.result / "result.json")["data"],
              "oneshot_data": args.data, "eval_data": args.eval_data, "dense": scores(dense, dense_logp, held_out)}
    report["evopress"] = scores(evopress.load_compressed(ours_dir), dense_logp, held_out)
    model = AutoModelForCausalLM.from_pretrained(dense_path, dtype=torch.float32)
    data = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    start = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=str(ours_dir / "llmcompressor_recipe.yaml"),
            num_calibration_samples=len(calib), max_seq_length=256, processor=tokenizer)
    report["oneshot_seconds"] = round(time.perf_counter() - start, 1)
    applied = {n: m.quantization_scheme.weights.num_bits for n, m in model.named_modules()
               if getattr(m, "quantization_scheme", None) is not None}
    report["bits_equal_profile"] = applied == profile
    report["layers"] = {"profile": len(profile), "quantized_by_llmcompressor": len(applied),
                        "differing": sorted(n for n in profile if applied.get(n) != profile[n])}
    report["llmcompressor"] = scores(model.eval(), dense_logp, held_out)
    (args.out / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
