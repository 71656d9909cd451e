"""evopress: non-uniform LLM compression by evolutionary search (EvoPress, Sieberling et al., ICML 2025).

Python API: ``evopress.search``, ``evopress.baseline``, ``evopress.pareto``, ``evopress.run`` (see
``evopress.api``); ``evopress.load_compressed`` reads any exported checkpoint back.

The API is imported on first use, so that ``import evopress`` alone does not import torch: a child
process that only tokenizes a text (``evopress.tokens``) starts in a fraction of a second.
"""

from importlib import import_module
from typing import Any

from .version import __version__

_API = {"Result": "api", "baseline": "api", "pareto": "api", "run": "api", "search": "api",
        "load_compressed": "loading"}

__all__ = sorted([*_API, "__version__"])


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_API[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
