"""Text sources and token pools.

Calibration and evaluation text are both turned into non-overlapping fixed-length windows of the
documents joined with blank lines, tokenized without special tokens (no BOS), remainder dropped: the
GPTQ/SparseGPT perplexity protocol. Fixed windows batch without padding, which matters more on our
hardware than the reference's unpacked variable-length documents.

Sources: ``wiki`` (default; held-out split of the embedded Wikipedia summaries), ``ptb`` (Penn
Treebank, the standard second set) or a local UTF-8 ``.txt`` (documents separated by blank lines) or
``.jsonl`` (one ``{"text": ...}`` object per line) file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import assets
from .errors import UserError

WIKI_SPLIT_SEED = 0
WIKI_EVAL_ARTICLES = 2000
SEPARATOR = "\n\n"
BINARY_SHARE = 0.01  # a .txt with more undecodable or NUL characters than this is not text


def _wiki_documents(role: str) -> list[str]:
    """Disjoint by article: a seeded permutation, the last 2,000 articles held out for evaluation."""
    data = json.loads(assets.wiki_summaries_json().read_text(encoding="utf-8"))
    titles = sorted(data)
    order = np.random.default_rng(WIKI_SPLIT_SEED).permutation(len(titles))
    cut = len(titles) - WIKI_EVAL_ARTICLES
    chosen = order[:cut] if role == "calibration" else order[cut:]
    return [data[titles[i]]["extract"] for i in chosen if data[titles[i]].get("extract")]


def _ptb_documents(role: str) -> list[str]:
    try:
        import treebank  # ships the PTB LM splits as module-level strings; nothing else is imported
    except ImportError as e:
        raise UserError(f"PTB needs the treebank package: {assets.INSTALL_HINT['treebank']}") from e
    return [treebank.penn["train" if role == "calibration" else "test"]]


def _jsonl_documents(path: Path) -> list[str]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x}); a .jsonl file must be "
                        "UTF-8 encoded") from e
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{path}:{n}: expected a JSON object with a 'text' field") from e
        if not isinstance(doc, str):
            raise UserError(f"{path}:{n}: 'text' must be a string, not {type(doc).__name__}")
        docs.append(doc)
    return docs


def _txt_documents(path: Path) -> list[str]:
    """Blank-line separated documents; a file that is mostly not UTF-8 text is refused, not searched on."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    bad = text.count("\ufffd") + text.count("\x00")
    if bad > BINARY_SHARE * len(text):
        raise UserError(f"{path} does not look like text: {bad} of its {len(text)} characters are not UTF-8 "
                        "or NUL; give a UTF-8 .txt or .jsonl file")
    return [d for d in text.split(SEPARATOR) if d.strip()]


def documents(source: str, role: str) -> list[str]:
    """``role`` is 'calibration' or 'evaluation'; built-in sources return disjoint splits."""
    if source == "wiki":
        return _wiki_documents(role)
    if source == "ptb":
        return _ptb_documents(role)
    path = Path(source).expanduser()
    if path.is_file():
        return _jsonl_documents(path) if path.suffix == ".jsonl" else _txt_documents(path)
    raise UserError(f"data '{source}' not found (use wiki, ptb, or a local .txt/.jsonl file)")


def tokenize_windows(tokenizer, docs: list[str], seq_len: int, max_tokens: int | None) -> torch.Tensor:
    """Join documents with blank lines and cut into [n, seq_len] windows, stopping once enough."""
    ids: list[int] = []
    want = None if max_tokens is None else max(seq_len, max_tokens)
    for doc in docs:
        ids.extend(tokenizer(doc + "\n\n", add_special_tokens=False)["input_ids"])
        if want is not None and len(ids) >= want:
            break
    n = len(ids) // seq_len
    if want is not None:
        n = min(n, -(-want // seq_len))
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


@dataclass
class Sample:
    """A set of token windows (some possibly truncated) drawn from a pool for one selection stage."""

    index: list[int]  # window indices into the pool
    lengths: list[int]  # tokens used from each window (the last one may be truncated)

    @property
    def tokens(self) -> int:
        return sum(self.lengths)


class TokenPool:
    """Calibration windows; stages draw fresh random samples from it."""

    def __init__(self, windows: torch.Tensor, source: str):
        if windows.ndim != 2 or windows.shape[0] == 0:
            raise UserError(f"data '{source}' yields no complete window of tokens; give more text "
                            "or a smaller --seq-len")
        self.windows = windows
        self.source = source

    @property
    def seq_len(self) -> int:
        return self.windows.shape[1]

    @property
    def tokens(self) -> int:
        return self.windows.numel()

    def sample(self, tokens: int, rng: np.random.Generator) -> Sample:
        """Uniform windows without replacement until exactly ``tokens`` (capped at the pool)."""
        return self._take(rng.permutation(len(self.windows)), tokens)

    def first(self, tokens: int) -> Sample:
        """A deterministic sample (the first windows), for scores every method must share."""
        return self._take(range(len(self.windows)), tokens)

    def _take(self, order, tokens: int) -> Sample:
        tokens = min(tokens, self.tokens)
        n = -(-tokens // self.seq_len)
        lengths = [self.seq_len] * n
        lengths[-1] = tokens - self.seq_len * (n - 1)
        return Sample([int(i) for i in order[:n]], lengths)

    def batches(self, sample: Sample, batch_size: int) -> list[tuple[torch.Tensor, list[int]]]:
        """Group the sample's windows into rectangular batches: (input_ids, window indices)."""
        by_len: dict[int, list[int]] = {}
        for i, n in zip(sample.index, sample.lengths):
            by_len.setdefault(n, []).append(i)
        out = []
        for n, idx in by_len.items():
            for s in range(0, len(idx), batch_size):
                chunk = idx[s: s + batch_size]
                out.append((self.windows[chunk, :n], chunk))
        return out


def _interleave(parts: list[torch.Tensor]) -> torch.Tensor:
    """Round-robin rows of several window tensors, so any prefix of the pool is a mix of all sources."""
    rows = [p[i] for i in range(max(len(p) for p in parts)) for p in parts if i < len(p)]
    return torch.stack(rows)


def load_pool(tokenizer, source: str, role: str, seq_len: int, max_tokens: int | None) -> TokenPool:
    """Windows of one source, or an equal-token mix of several joined by '+' (e.g. ``wiki+ptb``).

    Mixing matters because the search optimises the text it is shown: a profile calibrated on one
    domain can lose to a scoring baseline on another (docs/depth.md).
    """
    if seq_len < 2:
        raise UserError("--seq-len must be at least 2")
    sources = [source] if Path(source).expanduser().is_file() else [s for s in source.split("+") if s]
    if len(sources) == 1:
        return TokenPool(tokenize_windows(tokenizer, documents(sources[0], role), seq_len, max_tokens), source)
    share = None if max_tokens is None else -(-max_tokens // len(sources))
    parts = [load_pool(tokenizer, s, role, seq_len, share).windows for s in sources]
    return TokenPool(_interleave(parts), source)
