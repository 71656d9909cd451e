"""Inference speed of depth exports on the default model (CPU): dense vs exported, tokens/s.

    echo -19 > /proc/self/autogroup; OMP_NUM_THREADS=1 python benchmarks/depth_speed.py --out runs/depth-speed.json

For each target (fraction of attention and of MLP sub-blocks dropped) a fixed-seed random
sub-block configuration of the depth space is exported with ``evopress export``'s exporter; then
the dense model, the export loaded by plain ``from_pretrained`` (whole dropped blocks removed, lone
dropped sub-blocks still computed with a zeroed output projection) and the export loaded by
``evopress.load_compressed`` (lone dropped sub-blocks replaced by modules that compute nothing) are
timed on full forward passes (prefill, no KV cache) of random 256-token sequences at batch 1 and 8,
interleaved round by round so all share the same machine load; the median round gives tokens/s.
The three models' logits are compared too (the export must compute the configuration exactly).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import evopress
from evopress.models import Decoder, load_model
from evopress.spaces.drop.export import export
from evopress.spaces.drop.space import DropSpace


class _NoTokenizer:
    def save_pretrained(self, out: Path) -> None:
        pass


def tokens_per_s(models: dict[str, torch.nn.Module], batch: int, seq_len: int, rounds: int) -> dict[str, float]:
    ids = torch.randint(0, 49152, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for name, model in models.items():  # warm-up
            model(input_ids=ids, use_cache=False)
        for _ in range(rounds):
            for name, model in models.items():
                start = time.perf_counter()
                model(input_ids=ids, use_cache=False)
                times[name].append(time.perf_counter() - start)
    return {name: round(batch * seq_len / statistics.median(t), 1) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--targets", default="0.25,0.5")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    dense = load_model(None, torch.device("cpu"), torch.float32).model
    for target in (float(t) for t in args.targets.split(",")):
        exported = copy.deepcopy(dense)
        space = DropSpace(Decoder(exported), target, "sublayer")
        config = space.random_config(np.random.default_rng(args.seed))
        masks = space.masks(config)
        with tempfile.TemporaryDirectory() as tmp:
            summary = export(space, config, Path(tmp), _NoTokenizer())
            from transformers import AutoModelForCausalLM

            models = {"dense": dense,
                      "from_pretrained": AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="sdpa").eval(),
                      "load_compressed": evopress.load_compressed(tmp)}
        ids = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(1))
        space_model = copy.deepcopy(dense)
        reference = DropSpace(Decoder(space_model), target, "sublayer")
        reference.apply(config)
        with torch.inference_mode():
            expected = space_model(input_ids=ids).logits
            diffs = {n: (m(input_ids=ids).logits - expected).abs().max().item() for n, m in models.items()
                     if n != "dense"}
        row = {"target": target, "removed_blocks": sum(a and m for a, m in masks),
               "lone_attention": sum(a and not m for a, m in masks), "lone_mlp": sum(m and not a for a, m in masks),
               "num_hidden_layers": summary["num_hidden_layers"], "max_abs_logit_diff": diffs, "tokens_per_s": {}}
        for batch in (int(b) for b in args.batches.split(",")):
            speed = tokens_per_s(models, batch, args.seq_len, args.rounds)
            row["tokens_per_s"][batch] = {**speed, **{f"{n}_vs_dense": round(v / speed["dense"], 3)
                                                      for n, v in speed.items() if n != "dense"}}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del models, space_model, exported
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"threads": torch.get_num_threads(), "seq_len": args.seq_len,
                                        "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
