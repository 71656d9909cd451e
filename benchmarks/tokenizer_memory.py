"""What tokenizing the default calibration text leaves in the process: in-process against a child process.

    python benchmarks/tokenizer_memory.py                        # the tokenizer's own thread count
    RAYON_NUM_THREADS=8 python benchmarks/tokenizer_memory.py    # as on a bigger host

Each way runs in a fresh process (``--way here|apart``) with the default model's tokenizer loaded and
glibc's heap trimmed; it tokenizes the ``wiki`` and ``ptb`` calibration texts (``evopress.tokens``:
``_in_pieces`` here, ``token_ids`` through ``python -m evopress.tokens`` apart), drops the ids, trims
the heap again and prints the anonymous RSS that stayed, and the seconds taken. docs/scaling.md quotes it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def anon_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon")) / 1024


def measure(way: str) -> None:
    from transformers import AutoTokenizer

    from evopress import data, hostmem, tokens
    from evopress.models import resolve_model_path

    hostmem.map_large_allocations()
    tok = AutoTokenizer.from_pretrained(resolve_model_path(None)[1], local_files_only=True)
    tok("warm up")
    texts = [data.SEPARATOR.join(data.sample_documents(data.documents(s, "calibration"))) for s in ("wiki", "ptb")]
    hostmem.trim_heap()
    before, start = anon_mib(), time.perf_counter()
    for text in texts:
        if way == "apart":
            assert len(text) > tokens.APART_CHARS
            ids = tokens.token_ids(tok, text)
        else:
            ids = tokens._in_pieces(tok.backend_tokenizer, text, None, tokens.PIECE_CHARS)
        del ids
    seconds = time.perf_counter() - start
    hostmem.trim_heap()
    print(f"{way:5s}: {seconds:5.1f} s, {anon_mib() - before:5.0f} MiB of anonymous RSS left "
          f"(RAYON_NUM_THREADS={os.environ.get('RAYON_NUM_THREADS', 'unset')})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--way", choices=["here", "apart"], help="measure one way in this process")
    args = p.parse_args()
    if args.way:
        measure(args.way)
        return
    for way in ("here", "apart", "here", "apart"):  # alternated, twice
        subprocess.run([sys.executable, __file__, "--way", way], check=True)


if __name__ == "__main__":
    main()
