"""Run a GGUF in llama.cpp itself, through xllamacpp (the ``gguf-runtime`` extra): the proof that an export runs.

Why xllamacpp: a maintained binding with a prebuilt CPU wheel (no compiler), embedding llama.cpp's server
in-process; llama-cpp-python has no wheel here. Its API is the server's: completions with top-k log-probs
of generated tokens only, no logits. So the agreement with our torch model is measured on greedy top-1
tokens, teacher-forced: one request per prefix of a held-out text (the prompt cache keeps the prefix's
KV, so each request evaluates one token).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from ...errors import UserError

INSTALL = "pip install 'xllamacpp==2026.10.11549' (the evopress[gguf-runtime] extra)"


def server(path: Path, n_ctx: int = 512, threads: int = 1) -> Any:
    """llama.cpp's server on ``path``, in this process, greedy and quiet."""
    try:
        import xllamacpp
    except ImportError:
        raise UserError(f"running a GGUF in llama.cpp needs xllamacpp: {INSTALL}") from None
    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    params.n_ctx, params.n_parallel, params.warmup, params.verbosity = n_ctx, 1, False, -1
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = threads
    return xllamacpp.Server(params)


def _next(srv: Any, prompt: Sequence[int], n: int) -> list[int]:
    reply = srv.handle_completions({"prompt": list(prompt), "max_tokens": n, "temperature": 0.0, "logprobs": 1,
                                    "cache_prompt": True})
    return [c["id"] for c in reply["choices"][0]["logprobs"]["content"]]


def teacher_forced_top1(srv: Any, ids: Sequence[int]) -> list[int]:
    """llama.cpp's greedy next token after every prefix ``ids[:k]``, k = 1 .. len(ids) - 1."""
    return [_next(srv, ids[:k], 1)[0] for k in range(1, len(ids))]


def generation_speed(srv: Any, prompt: Sequence[int], tokens: int) -> tuple[list[int], float]:
    """Greedy continuation of ``prompt`` and its tokens per second (prompt evaluation excluded)."""
    _next(srv, prompt[:-1], 1)  # the prompt's KV, cached
    start = time.perf_counter()
    out = _next(srv, prompt, tokens)
    return out, len(out) / (time.perf_counter() - start)
