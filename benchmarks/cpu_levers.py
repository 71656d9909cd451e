"""Kernel-level levers for a CPU search (docs/speed.md, 'Time to quality'): intra-op threads and torch.compile.

    python benchmarks/cpu_levers.py [--windows 4 --seq-len 512 --repeat 3]

On the embedded default model (SmolLM2-135M, fp32), one batch of calibration windows:

(1) a dense candidate's block stack (all blocks, from the embeddings' output) with 1 and with 2
    intra-op threads, wall and process CPU time per call;
(2) ``torch.compile`` of one block's attention and MLP sub-modules: the compile time (first call,
    and the first call of the next block's, which has its own weights), against eager and compiled
    time per call. A depth search swaps sub-modules in and out, so every block's two sub-modules
    need their own compiled graph (or guards that accept the swap): the compile cost is paid per
    sub-module, 2 x blocks times, before the first generation.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from evopress.data import load_pool
from evopress.models import load_model


def timed(fn, repeat: int) -> tuple[float, float]:
    """Wall and process CPU seconds per call, after one untimed call."""
    fn()
    w, c = time.perf_counter(), time.process_time()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - w) / repeat, (time.process_time() - c) / repeat


def first_call(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    loaded = load_model(None, torch.device("cpu"), torch.float32)
    decoder = loaded.decoder
    pool = load_pool(loaded.tokenizer, "wiki", "calibration", args.seq_len, args.windows * args.seq_len)
    inputs = decoder.enter(pool.windows)
    out: dict = {"windows": args.windows, "seq_len": args.seq_len, "default_threads": torch.get_num_threads()}

    def stack() -> torch.Tensor:
        h = inputs.hidden
        for b in range(decoder.num_blocks):
            h = decoder.run_block(b, h, inputs)
        return h

    threads = torch.get_num_threads()
    for n in sorted({1, 2, threads}):
        torch.set_num_threads(n)
        out[f"stack_{n}_threads"] = dict(zip(("wall", "cpu"), timed(stack, args.repeat)))
    torch.set_num_threads(threads)

    h = inputs.hidden
    layer_args, layer_kwargs = inputs.layer_args[0]
    for kind in ("attn", "mlp"):
        modules = [getattr(decoder, kind)(b) for b in (0, 1)]
        if kind == "attn":
            kw = {k: v for k, v in layer_kwargs.items() if k in ("position_embeddings", "attention_mask")}
            calls = [lambda m=m: m(hidden_states=h, **kw)[0] for m in modules]
        else:
            calls = [lambda m=m: m(h) for m in modules]
        eager = timed(calls[0], args.repeat)
        compiled = [torch.compile(m) for m in modules]
        if kind == "attn":
            ccalls = [lambda m=m: m(hidden_states=h, **kw)[0] for m in compiled]
        else:
            ccalls = [lambda m=m: m(h) for m in compiled]
        compile_first = first_call(ccalls[0])
        compile_second = first_call(ccalls[1])
        fast = timed(ccalls[0], args.repeat)
        out[kind] = {"eager_wall": eager[0], "eager_cpu": eager[1], "compiled_wall": fast[0],
                     "compiled_cpu": fast[1], "compile_seconds_first_module": compile_first,
                     "compile_seconds_next_block": compile_second,
                     "max_abs_diff": float((calls[0]() - ccalls[0]()).abs().max())}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
