"""The ``Space`` interface: a ``Problem`` plus how a configuration enters the model.

The fitness needs to put a configuration into the model (``apply``) and to know which block each unit
lives in (``block_keys``), so that candidates sharing a prefix of blocks share its activations.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Sequence

import numpy as np

from ..errors import UserError
from .problem import Config, Problem, settle

class Space(ABC):
    name: ClassVar[str]
    units: list[str]  # module names, one per unit
    unit_block: list[int]  # decoder block of each unit
    problem: Problem
    num_blocks: int
    # a unit's level changes the token embedding or the LM head: a candidate scored from block 0 embeds its
    # tokens anew (else a stage embeds them once for all), and the teacher keeps the dense head's inputs and a
    # copy of its weight (else it keeps hidden-space products of the dense head: ``fitness.kl``)
    moves_embeddings: ClassVar[bool] = False

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

    def check_calibration(self, pool: Any) -> None:
        """Refuse calibration data the space's database was not built for (no-op without a database)."""

    def retarget(self, target: float | None) -> "Space | None":
        """This space at another target, sharing what does not depend on it, or None to build it afresh.

        Why: one process searching several budgets (``evopress pareto``) should open and check a level
        database once and keep its caches. Called with the model dense (``apply(None)``); the space it
        is called on is not used again. None (the default): nothing is worth sharing.
        """
        return None

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

    def repair(self, config: Sequence[int], rng: np.random.Generator, tries: int = 20000) -> Config | None:
        """``config`` moved into the budget by random single-level moves; None if they do not get there.

        For configurations made in big steps: a baseline's uniform bitwidth or whole blocks dropped can
        land below a budget window, a configuration projected onto rules misses an exact budget. Under a
        window or masks this is the mutation's own repair (``settle``), first without switching
        sub-blocks and then with; under an exact budget, moves mostly towards it, sometimes a detour.
        """
        c, p = list(config), self.problem
        if p.slack or p.masks:
            units = range(len(c))
            return tuple(c) if settle(c, p, rng, units) or settle(c, p, rng, units, masks=True) else None
        cost = p.cost(c)
        for _ in range(tries):
            gap = p.budget - cost
            if gap == 0:
                return tuple(c)
            s = int(rng.integers(len(c)))
            lv = c[s] + (1 if gap > 0 else -1)
            if not 0 <= lv < p.num_levels[s]:
                continue
            delta = p.costs[s][lv] - p.costs[s][c[s]]
            if abs(gap - delta) < abs(gap) or rng.random() < 0.05:  # mostly downhill, sometimes a detour
                c[s], cost = lv, cost + delta
        return tuple(c) if cost == p.budget else None

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

    def implied_target(self, config: Config) -> float:
        """The target whose budget ``config`` meets exactly: what a configuration found elsewhere was made for.

        ``import-config`` without ``--target`` builds the space with ``target=None`` (units, levels and
        costs, no budget yet), reads the file and asks this; a space that supports it overrides both.
        """
        raise UserError(f"space '{self.name}' cannot tell a configuration's target: give --target")

    def profile(self, config: Config) -> dict[str, int]:
        return dict(zip(self.units, config))

    def dense_bytes(self) -> int:
        """Bytes of the compressible modules (``model_space.units``) as the dense model stores them."""
        model = self.decoder.model  # type: ignore[attr-defined]
        return sum(module_bytes(model.get_submodule(u)) for u in self.model_space.units)

    def size_bytes(self, config: Config) -> int:
        """Bytes the compressible modules take under ``config`` (levels of ``model_space``).

        Why no generic answer: a budget counts what its space trades (dropped sub-blocks, non-zeros,
        bits), and only the space knows how that becomes bytes; a space that can say overrides this.
        """
        raise UserError(f"space '{self.name}' does not say how many bytes a configuration takes "
                        "(Space.size_bytes)")


class RetargetableSpace(Space):
    """A space whose target sets only its budget (``set_target``), so ``retarget`` is a shallow copy with a
    new budget: the copy shares everything else (an opened database, its caches, the layers' state)."""

    @abstractmethod
    def set_target(self, target: float | None) -> None:
        """Set ``target`` and everything that depends on it (``problem``)."""

    def retarget(self, target: float | None) -> "RetargetableSpace":
        space = copy.copy(self)
        space.set_target(target)
        return space


def module_bytes(module: Any) -> int:
    """Bytes of a module's parameters at their stored dtype (shared parameters once)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())
