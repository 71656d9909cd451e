"""How close the evaluator's KL is to the exact value, against the reference's float32 full-logit KL.

    python benchmarks/kl_precision.py [--windows 2 --target 0.25 --seed 0]

On the default model: a random configuration dropping ``--target`` of the sub-blocks, the first
``--windows`` calibration windows. Prints the exact KL (float64 softmaxes), the reference's
float32 ``kl_div`` and ours (``evopress.fitness``, the hidden-space identity), with their errors, and
how far a float32 softmax over the vocabulary sums from 1 (docs/speed.md).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from evopress.data import Sample
from evopress.pipeline import prepare
from evopress.recipe import Recipe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--target", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    recipe = Recipe(space="drop", target=args.target, seq_len=256, calib_tokens=256 * args.windows,
                    space_options={"granularity": "sublayer"}, init_from=[])  # no search: no warm start
    ctx = prepare(recipe, log=lambda m: None)
    decoder, space = ctx.decoder, ctx.space
    config = space.initial_configs(np.random.default_rng(args.seed), 1)[0]
    ids = ctx.pool.windows[: args.windows]
    logits = []
    with torch.inference_mode():
        for c in (None, config):
            space.apply(c)
            h = decoder.final_hidden(ids)
            logits.append(decoder.logits(decoder.norm(h)[:, :-1].reshape(-1, h.shape[-1])))
        teacher, student = logits
        lp64, lq64 = F.log_softmax(teacher.double(), -1), F.log_softmax(student.double(), -1)
        exact = (lp64.exp() * (lp64 - lq64)).sum(-1).mean().item()
        lp, lq = F.log_softmax(teacher, -1), F.log_softmax(student, -1)
        reference = F.kl_div(lq, lp, log_target=True, reduction="sum").item() / len(lp)
        drift = (lp.exp().sum(-1) - 1).mean().item()
    sample = Sample(list(range(args.windows)), [ctx.pool.seq_len] * args.windows)
    ours = ctx.evaluator.measure([config], sample)[0].kl
    print(f"float32 softmax sums to 1 {drift:+.1e} on average")
    print(f"exact (float64)      {exact:.9f}")
    print(f"reference (float32)  {reference:.9f}  {reference - exact:+.1e}")
    print(f"ours                 {ours:.9f}  {ours - exact:+.1e}")


if __name__ == "__main__":
    main()
