"""llm-compressor's ``oneshot`` with the recipe evopress exports: does it apply the profile's bits, on CPU?

    python3 -m venv /work/venv-llmc
    /work/venv-llmc/bin/pip install torch==2.13.0
    /work/venv-llmc/bin/pip install llmcompressor==0.14.0.1 transformers==5.17.0 compressed-tensors==0.19.0
    /work/venv-llmc/bin/pip install --no-deps -e .
    /work/venv-llmc/bin/python benchmarks/llmcompressor_recipe.py --out runs/llmc-recipe

A tiny random Llama (2 blocks, 14 linear layers, built in code as in the tests) gets a mixed profile
(2, 3, 4 and 8 bits in turn, group size 32); ``evopress.spaces.quant.export.llmcompressor_recipe``
turns it into the GPTQModifier recipe that ``evopress export`` writes as ``llmcompressor_recipe.yaml``;
``oneshot`` runs it on 8 random 16-token sequences on the CPU; then every linear layer's
``quantization_scheme`` (bits, group size, symmetry) is compared with the profile. This checks the
interchange (the recipe expresses the profile, oneshot runs on CPU), not quality.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.conftest: the tiny model and tokenizer

from evopress.spaces.quant.export import llmcompressor_recipe  # noqa: E402
from tests.conftest import tiny_model, word_tokenizer  # noqa: E402

GROUP = 32


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = word_tokenizer()
    tiny_model(layers=2).save_pretrained(args.out / "tiny")  # oneshot wants a model with a path
    tokenizer.save_pretrained(args.out / "tiny")
    model = AutoModelForCausalLM.from_pretrained(args.out / "tiny")
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    profile = {n: (2, 3, 4, 8)[i % 4] for i, n in enumerate(names)}
    recipe = args.out / "llmcompressor_recipe.yaml"
    recipe.write_text(yaml.safe_dump(llmcompressor_recipe(profile, GROUP, 0.01, act_order=True, symmetric=False), sort_keys=False))
    ids = torch.randint(3, 97, (8, 16), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    start = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=str(recipe), num_calibration_samples=8, max_seq_length=16,
            processor=tokenizer)
    seconds = time.perf_counter() - start
    applied = {n: m.quantization_scheme.weights for n, m in model.named_modules()
               if getattr(m, "quantization_scheme", None) is not None}
    report = {
        "layers": len(profile), "quantized": len(applied), "oneshot_seconds": round(seconds, 2),
        "bits_equal_profile": {n: a.num_bits for n, a in applied.items()} == profile,
        "group_size": sorted({a.group_size for a in applied.values()}),
        "symmetric": sorted({a.symmetric for a in applied.values()}),
        "bits_per_layer": {n: [profile[n], applied[n].num_bits if n in applied else None] for n in profile},
    }
    (args.out / "check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "bits_per_layer"}))


if __name__ == "__main__":
    main()
