"""What a compression space is, as the search, the fitness and the command line see it.

The search only needs a ``Problem``: how many levels each unit has, what each level costs and the
budget (exact, or a window below it), plus which units may trade levels with each other (``switch``). The fitness
additionally needs to put a configuration into the model (``apply``) and to know which block each
unit lives in, so that candidates sharing a prefix of blocks can share its activations. Everything
else a space brings (its command-line options, baselines, database builder and exporter) it
declares as data in a ``SpacePlugin``; the CLI, pipeline and report only read that record, so adding
a space adds one package under ``spaces/`` and one registry line.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

from ..errors import UserError

Config = tuple[int, ...]


class NoMoveError(RuntimeError):
    """No budget-preserving level switch exists: the budget pins the configuration."""


@dataclass(frozen=True)
class Problem:
    """A discrete configuration problem: ``config[u]`` in ``range(num_levels[u])`` and a budget rule.

    The budget rule: the total cost must lie in ``[budget - slack, budget]``. ``slack`` 0 (the default)
    is the exact rule of the paper's spaces, whose switch groups hold units with equal cost steps. A
    positive slack is for spaces whose units cost unequal amounts (the joint space's byte budget): no
    single up/down pair keeps the total, so ``switch`` repairs it into the window (see ``settle``).

    ``masks`` make a level switch a set of units off: ``(unit, level, members)`` means that while
    ``unit`` is at ``level`` the ``members`` cost nothing and their levels do not matter (a dropped
    sub-block's linear layers). Members of different masks must not overlap. With masks the total
    cost is no longer a plain sum, so ``cost`` and ``delta`` are the only ways to read it.
    """

    num_levels: tuple[int, ...]
    costs: tuple[tuple[int, ...], ...]  # costs[u][level], integers so the budget is exact
    budget: int
    groups: tuple[tuple[int, ...], ...]  # level switches happen inside one group
    slack: int = 0  # feasible totals: [budget - slack, budget]
    masks: tuple[tuple[int, int, tuple[int, ...]], ...] = ()  # (unit, level, members switched off)

    @cached_property
    def _masked_by(self) -> dict[int, int]:
        """Member unit -> index of the mask that can switch it off."""
        return {m: i for i, (_, _, members) in enumerate(self.masks) for m in members}

    @cached_property
    def controllers(self) -> dict[int, list[int]]:
        """Controlling unit -> indices of its masks."""
        out: dict[int, list[int]] = {}
        for i, (unit, _, _) in enumerate(self.masks):
            out.setdefault(unit, []).append(i)
        return out

    def _on(self, config: Sequence[int], mask: int) -> bool:
        unit, level, _ = self.masks[mask]
        return config[unit] == level

    def _members_cost(self, config: Sequence[int], mask: int) -> int:
        return sum(self.costs[m][config[m]] for m in self.masks[mask][2])

    def cost(self, config: Sequence[int]) -> int:
        total = sum(self.costs[u][level] for u, level in enumerate(config))
        return total - sum(self._members_cost(config, i) for i in range(len(self.masks)) if self._on(config, i))

    def active(self, config: Sequence[int], u: int) -> bool:
        """Whether unit ``u``'s level matters (no mask switches it off)."""
        i = self._masked_by.get(u)
        return i is None or not self._on(config, i)

    def delta(self, config: Sequence[int], u: int, level: int) -> int:
        """The change of ``cost(config)`` if unit ``u`` alone moves to ``level``."""
        if not self.active(config, u):
            return 0
        change = self.costs[u][level] - self.costs[u][config[u]]
        for i in self.controllers.get(u, ()):
            on_level = self.masks[i][1]
            if (config[u] == on_level) != (level == on_level):
                change += self._members_cost(config, i) * (1 if config[u] == on_level else -1)
        return change

    def cheapest(self) -> int:
        """A lower bound of the total cost (exact without masks): every mask on, every other unit lowest."""
        off = set(self._masked_by)
        return sum(min(c) for u, c in enumerate(self.costs) if u not in off)

    def feasible(self, config: Sequence[int]) -> bool:
        if not all(0 <= lv < n for lv, n in zip(config, self.num_levels)):
            return False
        return self.budget - self.slack <= self.cost(config) <= self.budget

    def admits_baseline(self, config: Sequence[int]) -> bool:
        """A baseline's answer: feasible, or with a budget window anywhere below it (uniform bits or whole
        blocks move in steps too large to land in a 0.1% window; they must only never exceed the budget)."""
        if self.feasible(config):
            return True
        windowed = bool(self.slack or self.masks)
        in_range = all(0 <= lv < n for lv, n in zip(config, self.num_levels))
        return windowed and in_range and self.cost(config) <= self.budget


def switch(config: list[int], problem: Problem, rng: np.random.Generator) -> None:
    """Move one unit a level up and another unit of the same group a level down, in place.

    The paper's level-switch move. It lives with ``Problem`` because spaces use it too (a random walk
    from a canonical configuration is the only cheap way to sample an exact-budget configuration).
    A problem with a budget window or masks takes ``window_switch`` instead.
    """
    if problem.slack or problem.masks:
        window_switch(config, problem, rng)
        return
    movable = []
    for group in problem.groups:
        ups = [u for u in group if config[u] < problem.num_levels[u] - 1]
        downs = [u for u in group if config[u] > 0]
        if ups and downs and (len(ups) > 1 or len(downs) > 1 or ups != downs):
            movable.append((group, ups, downs))
    if not movable:
        raise NoMoveError("no unit can trade a level with another: the budget leaves nothing to search")
    weights = np.array([len(g) for g, _, _ in movable], dtype=float)
    _, ups, downs = movable[rng.choice(len(movable), p=weights / weights.sum())]
    while True:
        up, down = ups[rng.integers(len(ups))], downs[rng.integers(len(downs))]
        if up != down:
            break
    config[up] += 1
    config[down] -= 1


def _steps(config: Sequence[int], problem: Problem, u: int) -> list[int]:
    return [lv for lv in (config[u] - 1, config[u] + 1) if 0 <= lv < problem.num_levels[u]]


def _cost_step(config: Sequence[int], problem: Problem, u: int, way: int) -> tuple[int, int]:
    """``(level, cost change)``: the nearest level of ``u`` in direction ``way`` that changes the cost
    (``(config[u], 0)`` if none). Levels of equal cost (a combined sparse level can tie a pure one) are
    stepped over, else a repair stalls on the tie."""
    lv = config[u] + way
    while 0 <= lv < problem.num_levels[u]:
        d = problem.delta(config, u, lv)
        if d:
            return lv, d
        lv += way
    return config[u], 0


def window_switch(config: list[int], problem: Problem, rng: np.random.Generator) -> None:
    """The level switch for unequal costs: one random move, then ``settle`` back into the budget window.

    A group is drawn with probability proportional to its size among those with a unit that can move
    (a unit a mask switches off cannot); one of its movable units moves one level up or down (a
    mask's controlling unit thereby switches its members off or back on); the other units of the
    group then settle the total into ``[budget - slack, budget]``. If they cannot, ``config`` is left
    outside the window and the caller's feasibility check rejects it.
    """
    movable = []
    for group in problem.groups:
        units = [u for u in group if problem.active(config, u) and _steps(config, problem, u)]
        if len(units) > 1:
            movable.append(units)
    if not movable:
        raise NoMoveError("no unit can move a level: the budget leaves nothing to search")
    weights = np.array([len(g) for g in movable], dtype=float)
    units = movable[rng.choice(len(movable), p=weights / weights.sum())]
    u = units[rng.integers(len(units))]
    steps = _steps(config, problem, u)
    config[u] = steps[rng.integers(len(steps))]
    settle(config, problem, rng, [v for v in units if v != u])


def settle(config: list[int], problem: Problem, rng: np.random.Generator, units: Sequence[int],
           max_moves: int | None = None, masks: bool = False) -> bool:
    """Move ``units`` one level at a time until the total cost is in the window; True if it got there.

    Each move is drawn at random among the single-level moves of ``units`` that go the right way: one
    landing in the window if any; else one that does not overshoot it; else the smallest overshoot,
    to come back from the other side. Random choice keeps the repairs, and so the children, diverse.
    A mask's controlling unit moves only with ``masks`` (a mutation's repair changes bits, not which
    sub-blocks exist; building a configuration under rules may need to drop some).
    """
    units = [u for u in units if masks or u not in problem.controllers]
    low, high = problem.budget - problem.slack, problem.budget
    cost = problem.cost(config)
    for _ in range(max_moves if max_moves is not None else 4 * len(units) + 16):
        if low <= cost <= high:
            return True
        need_down = cost > high
        moves = [(u, lv, d) for u in units if problem.active(config, u) for way in (-1, 1)
                 for lv, d in [_cost_step(config, problem, u, way)] if (d < 0 if need_down else d > 0)]
        if not moves:
            return False
        landing = [m for m in moves if low <= cost + m[2] <= high]
        short = [m for m in moves if (cost + m[2] > high if need_down else cost + m[2] < low)]
        pool = landing or short or [min(moves, key=lambda m: abs(m[2]))]
        u, lv, d = pool[rng.integers(len(pool))]
        config[u], cost = lv, cost + d
    return low <= cost <= high


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


# ----------------------------------------------------------------------------------------------
# What a space declares besides the search interface (read by the CLI, pipeline and report)


@dataclass(frozen=True)
class CliOption:
    """One command-line option of a space, described as data.

    The CLI offers the options of every registered space; spaces that declare the same flag share one
    argument (each keeps its own default and help). A value left unset takes the space's ``default``.
    """

    flags: tuple[str, ...]  # e.g. ("--group-rule",); the first names the argument
    key: str  # the keyword of the space's constructor (or builder) it becomes
    help: str
    default: Any = None
    type: Callable[[str], Any] = str
    is_flag: bool = False  # a switch without a value (store_true)
    convert: Callable[[Any], Any] | None = None  # e.g. make a path absolute

    @property
    def dest(self) -> str:
        return self.flags[0].lstrip("-").replace("-", "_")

    def value(self, given: Any) -> Any:
        """The option's value from what the user gave (None or False: not given)."""
        if given is None or (self.is_flag and given is False):
            given = self.default
        return self.convert(given) if self.convert is not None and given is not None else given


@dataclass
class BaselineInputs:
    """What a baseline may look at, explicitly: baselines depend on no pipeline object."""

    space: Space
    evaluator: Any  # ``sample(tokens, rng)`` and ``score(configs, sample)``, as the search uses it
    pool: Any  # the calibration TokenPool (scoring methods read dense activations from it)
    tokens: int  # calibration tokens a baseline looks at
    seed: int
    candidates: int = 32  # best-of-N random
    batch_size: int = 8


def shortest_decimal(near: Fraction, fits: Callable[[Fraction], bool]) -> float | None:
    """The float with the fewest decimals, rounded from ``near``, whose printed value ``fits`` (None if none).

    Spaces read a target back as ``Fraction(str(target))``; a target found from a configuration should
    print as a user would type it (2.25, not 2.2500000000000004) and still give that budget.
    """
    for digits in range(18):
        target = float(round(near, digits))
        if fits(Fraction(str(target))):
            return target
    return None


@dataclass(frozen=True)
class ConfigFormat:
    """A plain-text layout of configurations (ours or another tool's), as one space reads and writes it.

    ``read`` and ``write`` speak in levels of the model's own modules (``Space.model_space``), so rules
    never change a file; ``read`` raises ``UserError`` naming ``source`` and the line for a file that
    does not fit the model. ``fits_line`` lets ``import-config`` recognise a file without ``--format``
    (and, for a file with a bad line, pick the format whose reader names it).
    """

    help: str
    fits_line: Callable[[str], bool]  # one line, comment and surrounding blanks removed
    read: Callable[[str, Space, str], Config]  # (text, model space, source) -> levels
    write: Callable[[Space, Config], str]


Baseline = Callable[[BaselineInputs], Config]
# (decoder, pool, builder options, out, batch size, progress) -> manifest
Builder = Callable[[Any, Any, dict[str, Any], Path, int, bool], dict[str, Any]]
# (space without rules, its configuration, out, tokenizer) -> summary
Exporter = Callable[[Space, Config, Path, Any], dict[str, Any]]
# (checkpoint directory, its config.json, dtype) -> the model, or None: not a checkpoint this space reads
Loader = Callable[[Path, dict[str, Any], Any], Any]


@dataclass(frozen=True)
class SpacePlugin:
    """A space as the rest of evopress sees it: one record per package under ``spaces/``."""

    name: str
    space: Callable[..., Space]  # (decoder, target, **options) -> Space
    target_help: str  # what --target means in this space
    check_target: Callable[[float], None] | None = None  # raises UserError for a target out of range
    options: tuple[CliOption, ...] = ()  # search / baseline / import-config options -> space options
    baselines: Mapping[str, Baseline] = field(default_factory=dict)  # best-of-N random is added for all
    build: Builder | None = None  # level database builder, for spaces that need one
    build_options: tuple[CliOption, ...] = ()
    export: Exporter | None = None  # the default checkpoint layout of ``evopress export``
    export_formats: Mapping[str, Exporter] = field(default_factory=dict)  # others, by ``--format`` name
    load: Loader | None = None  # reads exports plain ``from_pretrained`` cannot (``evopress.load_compressed``)
    config_formats: Mapping[str, ConfigFormat] = field(default_factory=dict)  # besides our own (interchange)
    # baselines whose configurations join a search's initial population by default (``--init-from auto``);
    # () is the paper's random start. Under ``--rules``, ``default_init_with_rules`` (None: the same), for
    # baselines that refuse rules.
    default_init: tuple[str, ...] = ()
    default_init_with_rules: tuple[str, ...] | None = None

    def space_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """This space's options from command-line values keyed by argument name."""
        return {o.key: o.value(given.get(o.dest)) for o in self.options}

    def builder_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        return {o.key: o.value(given.get(o.dest)) for o in self.build_options}
