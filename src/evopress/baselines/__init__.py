"""Baselines that produce configurations in the same form as the search."""

from .drop import DROP_BASELINES, block_similarity
from .random_search import best_of_random

__all__ = ["DROP_BASELINES", "block_similarity", "best_of_random"]
