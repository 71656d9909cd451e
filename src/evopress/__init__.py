"""evopress: non-uniform LLM compression by evolutionary search (EvoPress, Sieberling et al., ICML 2025).

Python API: ``evopress.search``, ``evopress.baseline``, ``evopress.pareto``, ``evopress.run`` (see
``evopress.api``); ``evopress.load_compressed`` reads any exported checkpoint back.
"""

from .api import Result, baseline, pareto, run, search
from .loading import load_compressed
from .version import __version__

__all__ = ["Result", "baseline", "load_compressed", "pareto", "run", "search", "__version__"]
