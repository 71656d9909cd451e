"""What a compression space is, as the search and the fitness see it.

The search only needs a ``Problem``: how many levels each unit has, what each level costs and the
exact budget, plus which units may trade levels with each other. The fitness additionally needs to
put a configuration into the model (``apply``) and to know which block each unit lives in, so that
candidates sharing a prefix of blocks can share its activations. Adding a space means writing one
subclass; the search does not change.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np

from ..errors import UserError

Config = tuple[int, ...]


@dataclass(frozen=True)
class Problem:
    """A discrete configuration problem: ``config[u]`` in ``range(num_levels[u])``, exact budget."""

    num_levels: tuple[int, ...]
    costs: tuple[tuple[int, ...], ...]  # costs[u][level], integers so the budget is exact
    budget: int
    groups: tuple[tuple[int, ...], ...]  # level switches happen inside one group

    def cost(self, config: Sequence[int]) -> int:
        return sum(self.costs[u][level] for u, level in enumerate(config))

    def feasible(self, config: Sequence[int]) -> bool:
        return all(0 <= lv < n for lv, n in zip(config, self.num_levels)) and self.cost(config) == self.budget


class Space(ABC):
    name: ClassVar[str]
    units: list[str]  # module names, one per unit
    unit_block: list[int]  # decoder block of each unit
    problem: Problem
    num_blocks: int

    @abstractmethod
    def apply(self, config: Config | None) -> None:
        """Make the model compute ``config`` (``None``: the dense model), touching only what changed."""

    @abstractmethod
    def random_config(self, rng: np.random.Generator) -> Config:
        """A uniformly random feasible configuration."""

    @abstractmethod
    def options(self) -> dict[str, Any]:
        """What, besides the target, rebuilds this space (stored in result.json)."""

    @abstractmethod
    def budget_report(self, config: Config) -> dict[str, Any]:
        """Target and achieved budget in the space's own terms, for result.json."""

    @classmethod
    def options_from_args(cls, args: Any) -> dict[str, Any]:
        """Space options from parsed CLI arguments (``argparse.Namespace``)."""
        return {}

    @classmethod
    def build_database(cls, decoder: Any, pool: Any, args: Any, out: Path, progress: bool) -> dict[str, Any]:
        """Build this space's level database into ``out``; returns the manifest."""
        raise UserError(f"space '{cls.name}' needs no database")

    def check_calibration(self, pool: Any) -> None:
        """Refuse calibration data the space's database was not built for (no-op without a database)."""

    def export(self, config: Config, out: Path, tokenizer: Any) -> dict[str, Any]:
        """Write a checkpoint that plain ``transformers`` loads; returns a summary."""
        raise UserError(f"export is not supported for space '{self.name}'")

    def initial_configs(self, rng: np.random.Generator, n: int) -> list[Config]:
        """The search's starting candidates: random ones, unless a space has a canonical start."""
        return self.random_configs(rng, n)

    def random_configs(self, rng: np.random.Generator, n: int) -> list[Config]:
        """``n`` distinct random feasible configurations (fewer if the space is smaller)."""
        seen: dict[Config, None] = {}
        for _ in range(50 * n):
            seen.setdefault(self.random_config(rng))
            if len(seen) == n:
                break
        return list(seen)

    def block_keys(self, config: Config) -> tuple[tuple[int, ...], ...]:
        """Per block, the levels of its units: equal keys mean equal block computations."""
        keys: list[list[int]] = [[] for _ in range(self.num_blocks)]
        for u, level in enumerate(config):
            keys[self.unit_block[u]].append(level)
        return tuple(tuple(k) for k in keys)

    @property
    def model_space(self) -> "Space":
        """The space whose units are the model's own modules (itself, unless this space wraps another)."""
        return self

    def to_model_levels(self, config: Config) -> Config:
        """Levels of ``model_space.units`` for a configuration of this space."""
        return tuple(config)

    def from_model_levels(self, levels: Sequence[int]) -> Config:
        return tuple(levels)

    def level_labels(self, u: int) -> list[Any]:
        """What each level of unit ``u`` means to a user (text configs, reports): the index by default."""
        return list(range(self.problem.num_levels[u]))

    def profile(self, config: Config) -> dict[str, int]:
        return dict(zip(self.units, config))
