"""evopress: non-uniform LLM compression by evolutionary search (EvoPress, Sieberling et al., ICML 2025).

Python API: ``evopress.search``, ``evopress.baseline``, ``evopress.run`` (see ``evopress.api``);
``evopress.load_compressed`` reads any exported checkpoint back.
"""

from .api import Result, baseline, run, search
from .loading import load_compressed
from .version import __version__

__all__ = ["Result", "baseline", "run", "load_compressed", "search", "__version__"]
