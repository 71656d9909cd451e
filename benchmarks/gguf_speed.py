"""Generation speed of GGUF files in llama.cpp (xllamacpp), interleaved A/B/A/B so machine load hits all alike.

    python benchmarks/gguf_speed.py A.gguf B.gguf [...] [--repeats 5] [--tokens 128] [--threads 1]

Prints each file's median greedy tokens/s after a 32-token prompt, and its ratio to the first file's.
Run it in a shell shielded from other sessions (``echo -19 > /proc/self/autogroup``).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from evopress.spaces.gguf.runtime import generation_speed, server


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", type=Path, nargs="+")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    prompt = list(range(1000, 1032))
    speeds: list[list[float]] = [[] for _ in args.files]
    for _ in range(args.repeats):
        for f, out in zip(args.files, speeds):  # one server at a time: xllamacpp holds one model per process well
            srv = server(f, n_ctx=args.tokens + 64, threads=args.threads)
            out.append(generation_speed(srv, prompt, args.tokens)[1])
            del srv
    base = statistics.median(speeds[0])
    for f, s in zip(args.files, speeds):
        print(f"{f}: {statistics.median(s):.1f} tokens/s (x{statistics.median(s) / base:.3f}; runs "
              f"{', '.join(f'{v:.1f}' for v in s)})")


if __name__ == "__main__":
    main()
