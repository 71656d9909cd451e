"""Token ids of a long text, equal to tokenizing it in one call, in bounded memory and apart from the caller.

Tokenizing is done in pieces of ``PIECE_CHARS`` characters, so the tokenizer's temporaries stay bounded
whatever the text's length and pieces tokenize in parallel. A cut can change tokens (a blank line at the
end of a piece becomes one token instead of two; SentencePiece tokenizers add a leading space to every
string), so each piece is tokenized with ``CONTEXT_CHARS`` of the neighbouring text on both sides and
keeps only the tokens that start inside it. Two neighbouring pieces must agree on the tokens around the
cut; where they do not (a run of text longer than the context that the tokenizer splits differently
depending on where it starts), the two pieces are tokenized as one. The result equals one-shot
tokenization of the joined text (tested on BPE and SentencePiece-style tokenizers).

A text longer than ``APART_CHARS`` is tokenized in a child process (``python -m evopress.tokens``), which
gets the tokenizer's own serialization, so its ids are the same. Why: the tokenizer's worker threads keep
much of what they allocated after the text is tokenized (glibc's per-thread arenas, which
``malloc_trim`` does not hand back), and a search would hold it to its end: tens of MiB of host RAM per
tokenizer thread (docs/scaling.md). A child gives all of it back when it exits. It imports only numpy and tokenizers (this module imports nothing else), a fraction
of a second next to the tokenizing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PIECE_CHARS = 2**20
CONTEXT_CHARS = 2**12
PIECES_PER_CALL = 8  # pieces handed to the tokenizer at once: it tokenizes them in parallel
APART_CHARS = 2**20  # a longer text is tokenized in a child process


@dataclass
class _Piece:
    """The tokens of ``text[start:end]``, and the window's tokens around its two cuts for the seam check."""

    start: int
    end: int
    ids: np.ndarray
    head: list[tuple[int, int]]  # (offset, id) of its tokens starting in [start, start + CONTEXT_CHARS / 2)
    ahead: list[tuple[int, int]]  # (offset, id) of the window's tokens starting in [end, end + CONTEXT_CHARS / 2)


def _starting_in(starts: np.ndarray, ids: np.ndarray, a: int, b: int) -> list[tuple[int, int]]:
    """(offset, id) of the tokens that start in [a, b)."""
    m = (starts >= a) & (starts < b)
    return list(zip(starts[m].tolist(), ids[m].tolist()))


def _pieces(backend: Any, text: str, spans: list[tuple[int, int]]) -> list[_Piece]:
    """Tokenize each span with ``CONTEXT_CHARS`` of context on both sides; keep the tokens starting inside."""
    los = [max(0, s - CONTEXT_CHARS) for s, _ in spans]
    windows = [text[lo: min(len(text), e + CONTEXT_CHARS)] for lo, (_, e) in zip(los, spans)]
    seam = CONTEXT_CHARS // 2
    out = []
    for lo, (s, e), enc in zip(los, spans, backend.encode_batch(windows, add_special_tokens=False)):
        ids = np.asarray(enc.ids, dtype=np.int32)
        starts = np.fromiter((o[0] for o in enc.offsets), dtype=np.int64, count=len(ids)) + lo
        out.append(_Piece(s, e, ids[(starts >= s) & (starts < e)], _starting_in(starts, ids, s, s + seam),
                          _starting_in(starts, ids, e, e + seam)))
    return out


def _in_pieces(backend: Any, text: str, max_tokens: int | None, piece_chars: int) -> np.ndarray:
    done: list[_Piece] = []
    starts = list(range(0, len(text), piece_chars))
    for b in range(0, len(starts), PIECES_PER_CALL):
        spans = [(s, min(len(text), s + piece_chars)) for s in starts[b: b + PIECES_PER_CALL]]
        for piece in _pieces(backend, text, spans):
            while done and done[-1].ahead != piece.head:  # the cut changed tokens: tokenize both as one
                piece = _pieces(backend, text, [(done.pop().start, piece.end)])[0]
            done.append(piece)
        if max_tokens is not None and sum(len(p.ids) for p in done) >= max_tokens:
            break
    return np.concatenate([p.ids for p in done]) if done else np.zeros(0, dtype=np.int32)


def _serialized(backend: Any) -> str | None:
    """The tokenizer as JSON, or None if it has none (a custom Python component cannot be serialized)."""
    try:
        return backend.to_str()
    except Exception:  # tokenizers raises its own exception types for unserializable components
        return None


def _apart(spec: str, text: str, max_tokens: int | None, piece_chars: int) -> np.ndarray | None:
    """``_in_pieces`` run by ``python -m evopress.tokens`` on the tokenizer ``spec``: the text on its
    standard input, the ids (int32) on its standard output. None if the child failed: where the tokenizer
    runs is not worth a failed run (an interpreter that cannot start a child, a tokenizer that does not
    load from its own JSON), and a fault of the text itself shows again, in this process."""
    package_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="evopress-tokens-") as tmp:
        path = Path(tmp) / "tokenizer.json"
        path.write_text(spec, encoding="utf-8")
        limit = -1 if max_tokens is None else max_tokens
        proc = subprocess.run([sys.executable, "-m", __name__, str(path), str(limit), str(piece_chars)],
                              input=text.encode("utf-8", "surrogatepass"), capture_output=True, env=env)
    if proc.returncode != 0:
        lines = proc.stderr.decode(errors="replace").strip().splitlines() or ["no message"]
        warnings.warn(f"tokenizing the text in a child process failed (exit {proc.returncode}: {lines[-1]}); "
                      "tokenizing it in this process, which keeps the tokenizer threads' memory", stacklevel=3)
        return None
    return np.frombuffer(proc.stdout, dtype="<i4").astype(np.int32)


def token_ids(tokenizer: Any, text: str, max_tokens: int | None = None,
              piece_chars: int = PIECE_CHARS) -> np.ndarray:
    """Token ids of ``text`` (no special tokens), equal to tokenizing it in one call; see the module doc.

    With ``max_tokens``, tokenizing stops once at least that many tokens are known.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # no offsets to stitch pieces with: one call over the whole text
        return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)
    if len(text) > APART_CHARS and (spec := _serialized(backend)) is not None:
        ids = _apart(spec, text, max_tokens, piece_chars)
        if ids is not None:
            return ids
    return _in_pieces(backend, text, max_tokens, piece_chars)


def _main(argv: list[str]) -> None:
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(argv[0])
    text = sys.stdin.buffer.read().decode("utf-8", "surrogatepass")
    max_tokens = int(argv[1])
    ids = _in_pieces(backend, text, None if max_tokens < 0 else max_tokens, int(argv[2]))
    sys.stdout.buffer.write(ids.astype("<i4").tobytes())


if __name__ == "__main__":
    _main(sys.argv[1:])
