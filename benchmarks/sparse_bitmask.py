"""Sparse-bitmask export on the default model: file size against the dense-zeros export, and logits.

    OMP_NUM_THREADS=1 python benchmarks/sparse_bitmask.py --sparsities 0.5,0.7 --out runs/sparse-bitmask \\
        [--ct014 DIR]

The file size depends only on how many weights of each linear layer are zero, not on which (the
bitmask is one bit per weight whatever it holds; the values are the non-zeros), and a sparsity
search's budget fixes the total exactly. So, instead of building a level database, every linear
layer of the default model's blocks (SmolLM2-135M, fp32) is pruned to exactly ``round(s * n)`` zeros
by magnitude, and written both ways: ``save_pretrained`` (the default export: dense tensors with
zeros) and ``write_bitmask`` (what ``evopress export --format sparse-bitmask`` writes). Reported:
the weight files' sizes, the ratio over the whole file and over the pruned linear layers only,
and the largest logit difference between the dense export loaded by plain ``from_pretrained`` and
the bitmask export loaded by ``evopress.load_compressed``, on 4 windows of 256 random tokens. With
``--ct014 DIR`` (compressed-tensors 0.14.0.1, the last release with a sparse-bitmask decompressor:
``pip install --no-deps --target DIR compressed-tensors==0.14.0.1``): whether that decompressor,
built from our config.json, returns exactly our tensors.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

import evopress
from evopress.models import load_model
from evopress.spaces.sparsity.bitmask import read_sparse_weights, write_bitmask

CT014_CHECK = """
import json, sys
from pathlib import Path
import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.compressors.sparse_compressors.sparse_bitmask import BitmaskCompressor
from evopress.spaces.sparsity.bitmask import read_sparse_weights
path = Path(sys.argv[1])
qc = json.loads((path / "config.json").read_text())["quantization_config"]
compressor = ModelCompressor.from_compression_config(qc).sparsity_compressor
assert isinstance(compressor, BitmaskCompressor), type(compressor)
theirs = dict(compressor.decompress(str(path)))
ours = read_sparse_weights(path)
same = sorted(theirs) == sorted(ours) and all(torch.equal(theirs[k], ours[k]) for k in ours)
print(json.dumps({"tensors": len(theirs), "identical": same}))
"""


def ct014_check(path: Path, ct014: Path) -> dict:
    env = {"PYTHONPATH": f"{ct014}:{Path(evopress.__file__).parents[1]}", "PATH": "/usr/bin:/bin",
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CT014_CHECK, str(path)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def prune_by_magnitude(layers: dict[str, torch.nn.Module], sparsity: float) -> None:
    """Exactly round(sparsity * n) zeros in every layer: its smallest-magnitude weights."""
    with torch.no_grad():
        for layer in layers.values():
            flat = layer.weight.view(-1)
            k = round(sparsity * flat.numel())
            flat[flat.abs().argsort()[:k]] = 0


class _NoTokenizer:
    def save_pretrained(self, out: Path) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sparsities", default="0.5,0.7")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ct014", type=Path, default=None)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    rows = []
    for s in (float(x) for x in args.sparsities.split(",")):
        loaded = load_model(None, torch.device("cpu"), torch.float32)
        model, layers = loaded.model, loaded.decoder.linear_layers()
        prune_by_magnitude(layers, s)
        dense, sparse = args.out / f"{s}-dense", args.out / f"{s}-bitmask"
        model.save_pretrained(dense)
        write_bitmask(model, layers, sparse, _NoTokenizer())
        dense_bytes = (dense / "model.safetensors").stat().st_size
        sparse_bytes = (sparse / "model.safetensors").stat().st_size
        linear = sum(layer.weight.numel() * layer.weight.element_size() for layer in layers.values())
        ids = torch.randint(0, model.config.vocab_size, (4, 256), generator=torch.Generator().manual_seed(0))
        del model, loaded
        a = AutoModelForCausalLM.from_pretrained(dense, local_files_only=True).eval()
        b = evopress.load_compressed(sparse)
        with torch.inference_mode():
            diff = (a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max().item()
        qc = json.loads((sparse / "config.json").read_text())["quantization_config"]
        row = {"sparsity": s, "global_sparsity": round(qc["sparsity_config"]["global_sparsity"], 6),
               "dtype": str(a.dtype), "layers": len(layers), "dense_bytes": dense_bytes, "bitmask_bytes": sparse_bytes,
               "shrink_file": round(dense_bytes / sparse_bytes, 3),
               "shrink_linear": round(linear / (linear - (dense_bytes - sparse_bytes)), 3),
               "max_abs_logit_diff": diff}
        if args.ct014 is not None:
            row["compressed_tensors_0.14.0.1"] = ct014_check(sparse, args.ct014)
        rows.append(row)
        print(json.dumps(row), flush=True)
    (args.out / "sizes.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
