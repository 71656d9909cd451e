"""A Pareto front in one run: search a space at several budgets, with its baselines, on one loaded model.

The model, the calibration pool and its dense teacher are loaded once and shared by every budget
(``pipeline.retarget``); each budget gets its own space at its target, and a database-backed space
is the first one retargeted (``Space.retarget``): its database is opened and checked once, and the
layer variants and decoded levels it has cached serve every later budget. Budgets
run in the order given (ascending targets). Each budget's search starts from the space's own initial
configurations plus its neighbour's result projected onto the new budget (``project``), when a
projection exists; result.json says which (``warm_start``).

Layout of ``out``: ``target-<t>/`` per budget (the files ``evopress search`` writes, and eval.json),
``baselines/<method>/target-<t>/`` per baseline and budget (the files ``evopress baseline`` writes,
and eval.json), then ``front.json`` and ``front.png``. A rerun of the same command skips finished
budgets and baselines, resumes the search in progress from its checkpoint, and writes the same front.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .errors import UserError
from .evaluate import EVAL, EvalSettings, HeldOut, result_id, write_eval
from .io import locked_dir, read_json, write_json
from .pipeline import RESULT, Context, WarmStart, claim_output, prepare, retarget, run_baseline, run_search
from .recipe import Recipe, make_recipe
from .spaces import baseline, get_plugin
from .spaces.problem import Config, Problem
from .spaces.space import Space

FRONT = "front.json"
FRONT_PNG = "front.png"
WARM = "warm_start.json"
SEARCH = "evopress"
Log = Callable[[str], None]


@dataclass
class ParetoSettings:
    targets: list[float]  # ascending, distinct
    baselines: list[str] | None = None  # None: the space's own baselines (not best-of-N random)
    eval: EvalSettings | None = None  # None: wiki and ptb, as ``evopress eval``


def parse_targets(text: str, space: str) -> list[float]:
    """``"0.25,0.5"`` -> [0.25, 0.5]; refused unless numbers, distinct, ascending and in the space's range."""
    try:
        targets = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--targets '{text}' must be comma-separated numbers, e.g. 2.5,3,4") from None
    check_targets(targets)
    check = get_plugin(space).check_target
    for t in targets if check is not None else ():
        try:
            check(t)
        except UserError as e:
            raise UserError(f"--targets {t:g}: {e}") from None
    return targets


def check_targets(targets: Sequence[float]) -> None:
    if not targets:
        raise UserError("--targets names no target")
    for a, b in zip(targets, targets[1:]):
        if a == b:
            raise UserError(f"--targets repeats {a:g}")
        if b < a:
            raise UserError(f"--targets must be ascending ({a:g} comes before {b:g})")


def target_dir(out: Path, target: float, method: str = SEARCH) -> Path:
    name = f"target-{target:g}"
    return out / name if method == SEARCH else out / "baselines" / method / name


def project(config: Config, space: Space, rng: np.random.Generator) -> Config | None:
    """A configuration at ``space``'s budget reached from ``config`` (a neighbouring budget's result), or None.

    Under a budget window or masks (the joint space) it is the space's own repair (``Space.repair``, the
    mutation's ``settle``): only that reads a move's real cost (a layer of a dropped sub-block costs
    nothing) and accepts any total inside the window. Under an exact budget it is ``_walk``, which keeps
    what the switch keeps and the repair does not (the per-group balance). None when neither gets there,
    or the configuration does not fit the space.
    """
    problem = space.problem
    if len(config) != len(problem.num_levels) or not all(0 <= c < n for c, n in zip(config, problem.num_levels)):
        return None
    return space.repair(config, rng) if problem.slack or problem.masks else _walk(list(config), problem, rng)


def _walk(c: list[int], problem: Problem, rng: np.random.Generator) -> Config | None:
    """Single-level steps to an exact budget, each closing the gap without passing it (no unit moves back).

    It goes round the switch groups in turn, so a space whose groups must change together (depth: as
    many attention as MLP sub-blocks dropped) stays balanced. None when no step closes the remaining gap.
    """
    costs, groups = problem.costs, problem.groups
    gap, turn, idle = problem.budget - problem.cost(c), 0, 0
    while gap and idle < len(groups):
        group, turn = groups[turn % len(groups)], turn + 1
        steps = [(u, d, costs[u][c[u] + d] - costs[u][c[u]]) for u in group for d in (-1, 1)
                 if 0 <= c[u] + d < problem.num_levels[u]]
        steps = [s for s in steps if 0 < s[2] * np.sign(gap) and abs(s[2]) <= abs(gap)]
        if not steps:
            idle += 1
            continue
        u, d, delta = steps[rng.integers(len(steps))]
        c[u], gap, idle = c[u] + d, gap - delta, 0
    return tuple(c) if gap == 0 else None


def _warm_start(ctx: Context, previous: dict[str, Any] | None, index: int) -> WarmStart:
    """The neighbour's result projected onto this budget (seeded by the search seed and the budget's index)."""
    if previous is None:
        return WarmStart([], {"from_target": None, "projected": False,
                              "initial": "the space's initial configurations (first budget)"})
    config = project(ctx.space.from_model_levels(tuple(previous["levels"])), ctx.space,
                     np.random.default_rng((ctx.recipe.search.seed, 2, index)))
    return WarmStart([config] if config else [], {
        "from_target": previous["target"], "projected": config is not None,
        "initial": "the space's initial configurations plus the neighbour's result projected onto this budget"
        if config else "the space's initial configurations (no single-level walk reaches this budget)"})


def _check_neighbours(out: Path, targets: list[float], restart: bool) -> None:
    """Before the model loads: every budget begun earlier had the neighbour it has in ``targets``.

    Why: a budget's initial population holds its neighbour's result, so resuming one begun from
    another neighbour would mix two runs (``warm_start.json`` records where each began).
    """
    for previous, target in zip([None, *targets], targets):
        path = target_dir(out, target) / WARM
        if not restart and path.is_file() and read_json(path).get("from_target") != previous:
            raise UserError(f"{path.parent} was started from another neighbour ({read_json(path)['from_target']}); "
                            "use the same --targets or --restart")


def _finished(out: Path, restart: bool) -> dict[str, Any] | None:
    """The result already in ``out``, if any: ``claim_output`` has refused one made with other settings."""
    path = out / RESULT
    return None if restart or not path.is_file() else read_json(path)


class _Front:
    """Held-out evaluation of every result, and the points of the front."""

    def __init__(self, ctx: Context, settings: EvalSettings):
        self.settings, self.held = settings, None
        space = ctx.space
        space.model_space.size_bytes(space.to_model_levels(space.random_config(np.random.default_rng(0))))  # fail now
        space.apply(None)
        model = ctx.decoder.model
        self.units = ctx.space.model_space.units
        self.parameters = sum(p.numel() for u in self.units for p in model.get_submodule(u).parameters())
        self.model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.points: dict[str, list[dict[str, Any]]] = {}
        self.skipped: dict[str, list[dict[str, Any]]] = {}
        self.dense: dict[str, Any] | None = None

    def add(self, ctx: Context, method: str, out: Path, result: dict[str, Any], log: Log) -> None:
        space = ctx.space.model_space
        levels = tuple(result["levels"])
        size, dense = space.size_bytes(levels), space.dense_bytes()
        report = self._evaluate(ctx, out, result, log)
        sets = {s: report["datasets"][s] for s in self.settings.data}
        first = next(iter(sets.values()))
        if self.dense is None:
            self.dense = self._point(dense, dense, {s: {"ppl": d["dense_ppl"], "kl": 0.0} for s, d in sets.items()})
        point = {"target": result["target"], "dir": str(out), **self._point(size, dense, sets),
                 "calibration_kl": result["fitness"]["kl"], "kl": first["kl"], "ppl": first["ppl"]}
        self.points.setdefault(method, []).append(point)

    def skip(self, method: str, target: float, reason: str) -> None:
        self.skipped.setdefault(method, []).append({"target": target, "reason": reason})

    def _point(self, size: int, dense: int, sets: dict[str, Any]) -> dict[str, Any]:
        whole = self.model_bytes - dense + size
        return {"size_bytes": size, "model_bytes": whole, "model_gb": whole / 1e9,
                "bits_per_param": 8 * size / self.parameters,
                "held_out": {s: {"kl": d["kl"], "ppl": d["ppl"]} for s, d in sets.items()}}

    def _evaluate(self, ctx: Context, out: Path, result: dict[str, Any], log: Log) -> dict[str, Any]:
        path = out / EVAL
        if path.is_file():
            saved = read_json(path)
            if saved.get("result_id") == result_id(result) and set(self.settings.data) <= set(saved["datasets"]):
                return saved
        self.held = self.held or HeldOut(ctx.loaded, ctx.decoder, self.settings)
        config = ctx.space.from_model_levels(tuple(result["levels"]))
        return write_eval(out, result, self.held.measure(ctx.space, config, log), log)

    def to_json(self, recipe: Recipe, targets: list[float], loaded_name: str) -> dict[str, Any]:
        return {"space": recipe.space, "model": loaded_name, "targets": targets,
                "warm_start": "each budget after the first starts from the space's initial configurations plus "
                "its neighbour's result projected onto the budget by single-level steps (see result.json)",
                "units": len(self.units), "parameters": self.parameters, "model_bytes_dense": self.model_bytes,
                "size": "size_bytes: the compressible modules (the space's units) as the space stores them; "
                        "model_bytes: the whole model, the rest dense; bits_per_param: 8 x size_bytes / "
                        "parameters of the compressible modules",
                "eval": {"data": self.settings.data, "tokens": self.settings.tokens,
                         "seq_len": self.settings.seq_len},
                "dense": self.dense, "methods": self.points, "skipped": self.skipped}


def run_pareto(base: Recipe, settings: ParetoSettings, out: Path, restart: bool = False, progress: bool = True,
               log: Log = print) -> dict[str, Any]:
    """Search every target of ``settings`` (and run the baselines there); returns front.json's content."""
    out = Path(out)
    check_targets(settings.targets)
    recipes = [_at(base, t) for t in settings.targets]
    methods = _methods(base, settings.baselines)
    evaluation = settings.eval or EvalSettings(["wiki", "ptb"], bos=base.bos)
    _check_baseline_sample(methods, base, base.pool_tokens())  # before the model loads
    with locked_dir(out):
        _check_neighbours(out, settings.targets, restart)
        ctx: Context | None = None
        front: _Front | None = None
        previous = None
        for i, recipe in enumerate(recipes):
            ctx = prepare(recipe, log) if ctx is None else retarget(ctx, recipe)
            _check_baseline_sample(methods, recipe, ctx.pool.tokens)  # a text shorter than the pool asked for
            front = front or _Front(ctx, evaluation)
            log(f"budget {i + 1}/{len(recipes)}: target {recipe.target:g}")
            previous = _search(ctx, target_dir(out, recipe.target), previous, i, restart, progress, log)
            front.add(ctx, SEARCH, target_dir(out, recipe.target), previous, log)
            for method in methods:
                _baseline(ctx, method, target_dir(out, recipe.target, method), front, restart, log)
        assert ctx is not None and front is not None
        ctx.space.apply(None)
        data = front.to_json(base, settings.targets, ctx.loaded.name)
        write_json(out / FRONT, data)
        from .report import plot_front

        plot_front(data, out / FRONT_PNG)
        log(f"wrote {out / FRONT} and {out / FRONT_PNG}")
    return data



def _check_baseline_sample(methods: list[str], recipe: Recipe, pool_tokens: int) -> None:
    if methods and recipe.baseline_tokens > pool_tokens:
        raise UserError(f"--tokens {recipe.baseline_tokens} (the baselines' sample) is more than the calibration "
                        f"pool of {pool_tokens} tokens; give fewer or a larger --calib-tokens")

def _at(base: Recipe, target: float) -> Recipe:
    try:
        return make_recipe({**base.to_json(), "target": target, "method": SEARCH})
    except UserError as e:
        raise UserError(f"--targets {target:g}: {e}") from None


def _methods(base: Recipe, wanted: list[str] | None) -> list[str]:
    methods = list(get_plugin(base.space).baselines) if wanted is None else wanted
    for m in methods:
        baseline(base.space, m, "--baselines")
    return methods


def _search(ctx: Context, out: Path, previous: dict[str, Any] | None, index: int, restart: bool, progress: bool,
            log: Log) -> dict[str, Any]:
    warm = _warm_start(ctx, previous, index)
    with claim_output(out, ctx.recipe, restart):
        write_json(out / WARM, warm.record)
        done = _finished(out, restart)
        if done is not None:
            log(f"target {ctx.recipe.target:g}: finished before, kept ({out / RESULT})")
            return done
        log(f"target {ctx.recipe.target:g}: {warm.record['initial']}")
        return run_search(ctx, out, restart=restart, progress=progress, log=log, warm=warm)


def _baseline(ctx: Context, method: str, out: Path, front: _Front, restart: bool, log: Log) -> None:
    """One baseline at this budget, on the search's calibration pool (its recipe names the pool's size)."""
    recipe = make_recipe({**ctx.recipe.to_json(), "method": method, "calib_tokens": ctx.pool.tokens})
    with claim_output(out, recipe, restart):
        result = _finished(out, restart)
        if result is None:
            try:
                result = run_baseline(replace(ctx, recipe=recipe), out, log)
            except UserError as e:  # e.g. uniform at a target no single level meets
                log(f"{method} at target {recipe.target:g}: skipped ({e})")
                front.skip(method, recipe.target, str(e))
                return
        front.add(ctx, method, out, result, log)
