"""evopress: non-uniform LLM compression by evolutionary search (EvoPress, Sieberling et al., ICML 2025).

Python API: ``evopress.search``, ``evopress.baseline``, ``evopress.run`` (see ``evopress.api``).
"""

from .api import Result, baseline, run, search
from .version import __version__

__all__ = ["Result", "baseline", "run", "search", "__version__"]
