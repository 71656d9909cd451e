"""Sparse-bitmask export on the default model: file size against the dense-zeros export, and logits.

    bash benchmarks/sparse_bitmask.sh [OUT]          (builds what it needs, then runs this script)
    python benchmarks/sparse_bitmask.py RESULT_DIR... [--ct014 DIR]

For each sparsity result: both exports (`evopress export` and `--format sparse-bitmask`), the size of
their weight files (the rest of the directory is identical), the largest logit difference between
the dense-zeros export loaded by plain ``from_pretrained`` and the sparse-bitmask export loaded by
``evopress.load_compressed`` on 4 windows of 256 random tokens, and, with ``--ct014`` (a directory
holding compressed-tensors 0.14.0.1, the last release with a sparse-bitmask decompressor:
``pip install --no-deps --target DIR compressed-tensors==0.14.0.1``), whether that decompressor,
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
from evopress.pipeline import export_result
from evopress.spaces.sparsity.bitmask import read_sparse_weights

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
    env = {"PYTHONPATH": f"{ct014}:{Path(evopress.__file__).parents[1]}", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", CT014_CHECK, str(path)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--ct014", type=Path, default=None)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    rows = []
    for result in args.results:
        dense, sparse = result / "export-dense", result / "export-bitmask"
        summary = export_result(result, dense, log=lambda m: None)
        export_result(result, sparse, log=lambda m: None, fmt="sparse-bitmask")
        dense_bytes = (dense / "model.safetensors").stat().st_size
        sparse_bytes = (sparse / "model.safetensors").stat().st_size
        ids = torch.randint(0, 49152, (4, 256), generator=torch.Generator().manual_seed(0))
        a = AutoModelForCausalLM.from_pretrained(dense, local_files_only=True).eval()
        b = evopress.load_compressed(sparse)
        with torch.inference_mode():
            diff = (a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max().item()
        targets = json.loads((sparse / "config.json").read_text())["quantization_config"]["sparsity_config"]["targets"]
        decoded = read_sparse_weights(sparse)
        linear = sum(decoded[f"{t}.weight"].numel() * decoded[f"{t}.weight"].element_size() for t in targets)
        row = {"result": str(result), "achieved_sparsity": summary["achieved_sparsity"], "dtype": str(a.dtype),
               "dense_bytes": dense_bytes, "bitmask_bytes": sparse_bytes,
               "shrink": round(dense_bytes / sparse_bytes, 3),
               "linear_shrink": round(linear / (linear - (dense_bytes - sparse_bytes)), 3),
               "max_abs_logit_diff": diff}
        if args.ct014 is not None:
            row["compressed_tensors_0.14.0.1"] = ct014_check(sparse, args.ct014)
        rows.append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
