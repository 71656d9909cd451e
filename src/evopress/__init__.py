"""evopress: non-uniform LLM compression by evolutionary search (EvoPress, Sieberling et al., ICML 2025)."""

__version__ = "0.1.0"
