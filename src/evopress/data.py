"""Text sources and token pools.

The perplexity protocol (GPTQ/SparseGPT, ``PROTOCOL``): a source's documents are joined with blank
lines into one text, the text is tokenized as a whole without special tokens (no BOS), and the token
stream is cut into non-overlapping fixed-length windows, remainder dropped. Fixed windows batch without
padding, which matters more on our hardware than the reference's unpacked variable-length documents.

- **Evaluation** takes the first windows of the held-out text, as GPTQ evaluates the first windows of the
  joined test split: the standard protocol, and the same windows for every result.
- **Calibration** draws its windows across the whole text: all windows of the joined text, in a seeded
  random order (``POOL_SEED``, independent of the search seed), the pool being the first
  ``--calib-tokens`` worth. A pool of any size is therefore a prefix of a larger one, so
  ``TokenPool.first`` gives every method the same sample whatever pool size its run used. A text longer
  than ``TEXT_BUDGET_CHARS`` characters (2^26, roughly 16M tokens of English) is first reduced to a
  seeded random sample of its documents of about that size, so the token ids held (4 bytes each) and the
  tokenizing time stay bounded; the text itself is read whole.

Tokenizing "as a whole" is ``tokens.token_ids``: in pieces, exactly, and apart from this process.

Sources: a built-in text (``corpora.CORPORA``: each split into calibration and evaluation documents)
or a local UTF-8 ``.txt`` (documents separated by blank lines) or ``.jsonl`` (one ``{"text": ...}``
object per line) file; ``a+b`` mixes sources in equal shares, and every window remembers its source,
so stages sample the sources equally and the fitness can be scored per source (``fitness.aggregate``).
The default calibration mixes four genres (``DEFAULT_CALIBRATION``): a profile calibrated on one domain
specialises to it (docs/generalization.md), and users rarely know what their model will serve.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .corpora import CORPORA
from .errors import UserError
from .tokens import token_ids

SEPARATOR = "\n\n"
PROTOCOL = "GPTQ protocol: documents joined with blank lines, tokenized as one text without special tokens"
POOL_SEED = 0
DEFAULT_CALIBRATION = "wiki+ptb+docs+tweets"  # encyclopedic, news, technical docs, social media (corpora.py)
DEFAULT_EVAL = ("wiki", "ptb")  # held out: the Wikipedia evaluation split and PTB test, reported apart
TEXT_BUDGET_CHARS = 2**26
BINARY_SHARE = 0.01  # a .txt with more undecodable or NUL characters than this is not text
MIN_POOL_TOKENS = 32768  # the smallest default calibration pool
STAGE_SHARE = 4  # a default pool holds at least 4x the largest stage sample (overlap 25% or less)


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
    if source in CORPORA:
        return CORPORA[source].documents(role)
    path = Path(source).expanduser()
    if path.is_file():
        return _jsonl_documents(path) if path.suffix == ".jsonl" else _txt_documents(path)
    raise _not_found(source)


def _not_found(part: str) -> UserError:
    return UserError(f"data '{part}' not found (use {', '.join(CORPORA)}, or a local .txt/.jsonl file)")


def source_parts(source: str) -> list[str]:
    """The texts a data setting names: one file (whose name may hold '+'), or the parts of a mix ``a+b``."""
    return [source] if Path(source).expanduser().is_file() else [s for s in source.split("+") if s]


def check_source(source: str) -> None:
    """Refuse a data setting that names no text, or a part that is neither built in nor a file.

    Called before a model loads (``recipe.check_inputs``), so a typo in ``wiki+ptbb`` costs no load.
    """
    parts = source_parts(source)
    if not parts:
        raise UserError(f"data '{source}' names no text (use {', '.join(CORPORA)}, or a local .txt/.jsonl file)")
    for part in parts:
        if part not in CORPORA and not Path(part).expanduser().is_file():
            raise _not_found(part)


def sample_documents(docs: list[str], budget: int = TEXT_BUDGET_CHARS) -> list[str]:
    """All documents, or a seeded random sample of about ``budget`` characters kept in text order.

    Documents are taken in a seeded random order until the budget is reached (the last one may pass
    it; a single document longer than the budget is cut to it), so the sample is spread over the text.
    """
    if sum(len(d) + len(SEPARATOR) for d in docs) <= budget:
        return docs
    chosen, used = [], 0
    for i in np.random.default_rng(POOL_SEED).permutation(len(docs)):
        chosen.append(int(i))
        used += len(docs[i]) + len(SEPARATOR)
        if used >= budget:
            break
    return [docs[i][:budget] for i in sorted(chosen)]


def _grid(ids: np.ndarray, seq_len: int) -> torch.Tensor:
    n = len(ids) // seq_len
    return torch.from_numpy(ids[: n * seq_len].astype(np.int64)).view(n, seq_len)


def _windows_for(max_tokens: int | None, seq_len: int, available: int) -> int:
    return available if max_tokens is None else min(available, -(-max(seq_len, max_tokens) // seq_len))


def calibration_windows(tokenizer: Any, docs: list[str], seq_len: int, max_tokens: int | None) -> torch.Tensor:
    """Windows drawn across the whole (sampled) joined text, in a seeded order; see the module doc."""
    return _seeded_windows(token_ids(tokenizer, SEPARATOR.join(sample_documents(docs))), seq_len, max_tokens)


def _seeded_windows(ids: np.ndarray, seq_len: int, max_tokens: int | None) -> torch.Tensor:
    grid = _grid(ids, seq_len)
    order = torch.from_numpy(np.random.default_rng(POOL_SEED).permutation(len(grid)))
    return grid[order[: _windows_for(max_tokens, seq_len, len(grid))]]


@functools.lru_cache(maxsize=4)
def _calibration_ids(tokenizer: Any, source: str, stamp: tuple[int, int] | None) -> np.ndarray:
    """A calibration text's token ids, once per process and text version (``stamp``: a file's mtime and size).

    Why: a search cuts its pool and its held-aside track sample from the same text, and tokenizing a
    whole built-in text takes seconds.
    """
    return token_ids(tokenizer, SEPARATOR.join(sample_documents(documents(source, "calibration"))))


def _stamp(source: str) -> tuple[int, int] | None:
    path = Path(source).expanduser()
    if not path.is_file():
        return None
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


def evaluation_windows(tokenizer: Any, docs: list[str], seq_len: int, max_tokens: int | None) -> torch.Tensor:
    """The first windows of the joined text (GPTQ); only as much text as they need is tokenized."""
    grid = _grid(token_ids(tokenizer, SEPARATOR.join(docs), max_tokens), seq_len)
    return grid[: _windows_for(max_tokens, seq_len, len(grid))]


@dataclass
class Sample:
    """A set of token windows (some possibly truncated) drawn from a pool for one selection stage."""

    index: list[int]  # window indices into the pool
    lengths: list[int]  # tokens used from each window (the last one may be truncated)

    @property
    def tokens(self) -> int:
        return sum(self.lengths)


class TokenPool:
    """Calibration windows, each labelled with its source; stages draw fresh random samples from it."""

    def __init__(self, windows: torch.Tensor, source: str, bos: int | None = None,
                 labels: torch.Tensor | None = None):
        """``labels``: per window, the index of its part of ``source`` (``source_parts``); None: one source."""
        if windows.ndim != 2 or windows.shape[0] == 0:
            raise UserError(f"data '{source}' yields no complete window of tokens; give more text "
                            "or a smaller --seq-len")
        self.windows = windows
        self.source = source
        self.bos = bos  # every window starts with this token (then seq_len - 1 tokens of text), or None
        self.names = tuple(source_parts(source)) if labels is not None else (source,)
        self.labels = labels if labels is not None else torch.zeros(len(windows), dtype=torch.long)

    def tail(self, start: int) -> "TokenPool":
        """The windows from ``start`` on, with their labels."""
        return TokenPool(self.windows[start:], self.source, self.bos,
                         self.labels[start:] if len(self.names) > 1 else None)

    @property
    def seq_len(self) -> int:
        return self.windows.shape[1]

    @property
    def tokens(self) -> int:
        return self.windows.numel()

    def sample(self, tokens: int, rng: np.random.Generator) -> Sample:
        """Uniform windows without replacement until exactly ``tokens``, in equal shares of the sources
        (up to a window): a stage of a mixed pool then weighs every source alike, as the pool does."""
        if len(self.names) == 1:
            return self._take(rng.permutation(len(self.windows)), tokens)
        groups = [np.flatnonzero(self.labels.numpy() == s) for s in range(len(self.names))]
        return self._take(_round_robin([g[rng.permutation(len(g))] for g in groups]), tokens)

    def first(self, tokens: int) -> Sample:
        """A deterministic sample (the first windows), for scores every method must share."""
        return self._take(range(len(self.windows)), tokens)

    def _take(self, order, tokens: int) -> Sample:
        if tokens > self.tokens:  # never a silently smaller sample (pipeline.prepare checks the schedule)
            raise UserError(f"a sample of {tokens} tokens does not fit the calibration pool of {self.tokens} "
                            f"tokens of '{self.source}'; raise --calib-tokens or sample fewer tokens")
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


def _round_robin(parts: list[Sequence[Any]]) -> list[Any]:
    """The parts' items taken in turn, so any prefix holds every part in equal shares (as far as they go)."""
    return [p[i] for i in range(max(len(p) for p in parts)) for p in parts if i < len(p)]


BOS_POLICIES = ("auto", "always", "never")


def bos_token(tokenizer: Any, policy: str = "auto") -> int | None:
    """The token every window starts with, or None.

    Families trained with BOS at the start of every sequence (Llama-3, Gemma) degrade without it, so
    ``auto`` does what the tokenizer does by default: it adds BOS if ``tokenizer("x")`` starts with it
    (SmolLM2's and Llama-2-style setups do not, so their windows stay plain text).
    """
    if policy not in BOS_POLICIES:
        raise UserError(f"--bos {policy}: choose from {', '.join(BOS_POLICIES)}")
    bos = getattr(tokenizer, "bos_token_id", None)
    if policy == "never":
        return None
    if policy == "always":
        if bos is None:
            raise UserError("--bos always: the tokenizer has no BOS token")
        return bos
    ids = tokenizer("x")["input_ids"]
    return bos if bos is not None and ids and ids[0] == bos else None


def load_pool(tokenizer, source: str, role: str, seq_len: int, max_tokens: int | None,
              bos: int | None = None) -> TokenPool:
    """Windows of one source, or an equal-token mix of several joined by '+' (e.g. ``wiki+ptb``).

    Mixing matters because the search optimises the text it is shown: a profile calibrated on one
    domain can lose to a scoring baseline on another (docs/depth.md). With ``bos`` every window is
    that token followed by ``seq_len - 1`` tokens of text (BOS is never a label, so it is never scored).
    """
    if seq_len < 2 + (bos is not None):
        raise UserError(f"--seq-len must be at least {2 + (bos is not None)}")
    check_source(source)
    sources = source_parts(source)
    if len(sources) == 1:
        length = seq_len - (bos is not None)
        if role == "calibration":
            text = _seeded_windows(_calibration_ids(tokenizer, sources[0], _stamp(sources[0])), length, max_tokens)
        else:
            text = evaluation_windows(tokenizer, documents(sources[0], role), length, max_tokens)
        if bos is not None:
            text = torch.cat([torch.full((len(text), 1), bos, dtype=text.dtype), text], dim=1)
        return TokenPool(text, source, bos)
    share = None if max_tokens is None else -(-max_tokens // len(sources))
    parts = [load_pool(tokenizer, s, role, seq_len, share, bos).windows for s in sources]
    labels = [torch.full((len(p),), n) for n, p in enumerate(parts)]
    return TokenPool(torch.stack(_round_robin(parts)), source, bos, torch.stack(_round_robin(labels)))


def default_pool_tokens(samples: dict[str, int], stage: int) -> int:
    """The pool a run gets when it does not set one: ``MIN_POOL_TOKENS``, ``STAGE_SHARE`` x its largest
    stage sample, or its largest other sample, whichever is most (the text permitting)."""
    return max(MIN_POOL_TOKENS, STAGE_SHARE * stage, *samples.values())


def check_samples(samples: dict[str, int], stage: int, pool_tokens: int, holder: str,
                  log: Callable[[str], None]) -> None:
    """Refuse a sample larger than the pool; warn loudly when the stages' samples would mostly overlap.

    ``samples`` maps what sets each sample (a flag) to its tokens, ``stage`` is the largest selection
    stage's sample (0 without a search), ``holder`` names what holds ``pool_tokens`` for the message.
    Two independent samples of k windows out of n share k/n of their windows on average, so a stage
    drawing more than 1/``STAGE_SHARE`` of the pool sees largely the same data every generation.
    """
    what, need = max(samples.items(), key=lambda kv: kv[1])
    fix = max(need, STAGE_SHARE * stage)
    if need > pool_tokens:
        raise UserError(f"{what} ({need} tokens) is larger than {holder} ({pool_tokens} tokens); give "
                        f"--calib-tokens {fix} or more (or leave it unset to size the pool from the schedule), "
                        "or sample fewer tokens")
    if STAGE_SHARE * stage > pool_tokens:
        share = round(100 * stage / pool_tokens)
        log(f"WARNING: the largest --stages sample ({stage} tokens) is {share}% of {holder} ({pool_tokens} "
            f"tokens): two such samples share about {share}% of their windows, so every stage sees largely "
            f"the same data; --calib-tokens {fix} or more keeps the overlap at 25% or less")
