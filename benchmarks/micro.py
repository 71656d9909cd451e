"""Micro-benchmarks behind docs/speed.md's profile: where a candidate-token's time goes besides the blocks.

    python benchmarks/micro.py [--hidden 576 --vocab 49152 --tokens 1024 --blocks 16,32,64]

(1) The LM head and KL for one chunk of positions: the head matmul, then either the reference's
full-vocabulary KL (log-softmax, KL against cached teacher log-probs) or ours, KL = a + logsumexp(z) -
u.s with the teacher's u = W^T p and a = sum p log p cached per position (``evopress.fitness``). (2) Decoding one sparse level (1-bit mask + fp16
values) into a dense 1536 x 576 weight, the sparsity space's `apply`. (3) One SparseGPT level of that
layer with one and with two intra-op threads (why the database builders run solvers single-threaded).
(4) ``fitness.compare`` over ``--tokens`` positions with the embedded default model's head, for each
LM-head block size in ``--blocks`` (MiB; ``fitness.block_bytes_for`` picks the CPU default): process CPU
time, which a busy shared machine inflates less than wall time. Shapes default to SmolLM2-135M.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from evopress.compressors.packing import pack_codes, unpack_codes
from evopress.compressors.sparsegpt import sparsegpt_prune_levels
from evopress.fitness import compare, logsumexp_, teacher_targets
from evopress.models import Hardware
from evopress.spaces.sparsity.storage import decode_level


def timed(fn, repeat: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--blocks", default="16,32,64", help="LM-head block sizes for (4), MiB")
    args = p.parse_args()
    torch.manual_seed(0)
    head = torch.randn(args.vocab, args.hidden) / args.hidden**0.5
    h = torch.randn(args.tokens, args.hidden)
    teacher = F.log_softmax(torch.randn(args.tokens, args.vocab), -1)
    p_t = teacher.exp()
    u, a = p_t @ head, (p_t * teacher).sum(-1)
    with torch.inference_mode():
        parts = {
            "head matmul": lambda: h @ head.T,
            "  + log_softmax + kl_div (reference)": lambda: F.kl_div(F.log_softmax(h @ head.T, -1), teacher,
                                                                     log_target=True, reduction="sum"),
            "  + a + logsumexp_ - u.s (ours)": lambda: (a + logsumexp_(h @ head.T) - (h * u).sum(-1)).sum(),
        }
        print(f"per {args.tokens} positions, hidden {args.hidden}, vocab {args.vocab}:")
        for name, fn in parts.items():
            print(f"  {name:38s} {timed(fn, args.repeat):.3f} s")
        shape = (1536, 576)
        keep = torch.rand(shape) > 0.5
        mask = pack_codes(keep.to(torch.uint8).reshape(-1), 1)
        values = torch.randn(int(keep.sum())).half()
        print(f"one sparse level, {shape[0]} x {shape[1]} at 50%:")
        print(f"  unpack 1-bit mask                {timed(lambda: unpack_codes(mask, 1, shape), 50) * 1e3:.2f} ms")
        print(f"  decode (unpack + masked_scatter) "
              f"{timed(lambda: decode_level(mask, values, shape, torch.float32), 50) * 1e3:.2f} ms")
        x = torch.randn(4096, shape[1])
        weight, hessian = torch.randn(shape), x.T @ x / len(x)
        threads = torch.get_num_threads()
        print(f"one SparseGPT level (50%) of {shape[0]} x {shape[1]}:")
        for n in sorted({1, threads}):
            torch.set_num_threads(n)
            seconds = timed(lambda: sparsegpt_prune_levels(weight, hessian, [weight.numel() // 2]), 3)
            print(f"  {n} thread(s)                       {seconds:.3f} s")
        torch.set_num_threads(threads)
        head_blocks(args.tokens, [int(b) for b in args.blocks.split(",")], args.repeat)


def head_blocks(tokens: int, blocks: list[int], repeat: int) -> None:
    decoder = Hardware("cpu").load(None).decoder
    hidden, vocab = decoder.head.weight.shape[1], decoder.head.weight.shape[0]
    dense = decoder.norm(torch.randn(1, tokens + 1, hidden))
    labels = torch.randint(0, vocab, (tokens,))
    targets = {**teacher_targets(decoder, dense[0, :-1], labels, tokens), "labels": labels}
    student = decoder.norm(dense + 0.1 * torch.randn_like(dense))
    print(f"compare() over {tokens} positions, the default model's head ({vocab} x {hidden}), CPU seconds:")
    for round_ in range(2):  # interleaved, so a change in the machine's load hits every size alike
        for mib in blocks:
            fn = lambda: compare(decoder, student, targets, tokens, mib << 20)  # noqa: E731
            fn()
            start = time.process_time()
            for _ in range(repeat):
                fn()
            seconds = (time.process_time() - start) / repeat
            print(f"  round {round_ + 1}, blocks of {mib:3d} MiB          {seconds:.3f} s")


if __name__ == "__main__":
    main()
