"""An EvoPress search on a run's context: initial population and warm start, the evolution with a
checkpoint after every generation, the held-aside track, and the result."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..data import Sample, load_pool
from ..distributed import from_main, is_main, sharded
from ..errors import UserError
from ..evolution import SearchState, evolve
from ..fitness import Evaluator, Measurement
from ..io import write_json
from ..interchange import choose_format, read_text
from ..recipe import Recipe, is_config_file
from ..spaces import baseline
from ..spaces.problem import Config, NoMoveError, switch
from .baselines import baseline_config
from .context import Context
from .outputs import CHECKPOINT, RECIPE, load_checkpoint, result_record, save_result


@dataclass
class WarmStart:
    """Configurations a search adds to its initial population, and what result.json says about them."""

    configs: list[Config]
    record: dict[str, Any]


def run_search(ctx: Context, out: Path, restart: bool = False, progress: bool = True,
               log: Callable[[str], None] = print, warm: WarmStart | None = None) -> dict[str, Any]:
    """EvoPress search with a checkpoint after every generation; rerunning resumes it.

    Under torchrun rank 0 reads the checkpoint and every rank resumes from its copy: ranks reading
    --out on their own could start from different generations (a checkpoint written in between, or
    another file system's view of it) and then split different candidates.
    """
    recipe = ctx.recipe
    out = Path(out)
    fingerprint = recipe.fingerprint()
    state = None if restart else from_main(lambda: load_checkpoint(out, recipe))
    if state is not None:
        log(f"resuming from generation {state.generation}")
    initial = _initial_population(ctx, state is None, log)
    if warm is not None and state is None:
        initial = list(dict.fromkeys(initial + warm.configs))
    if is_main():
        write_json(out / RECIPE, recipe.to_json())
    start = time.perf_counter()
    log(f"teacher: the dense model over all {ctx.pool.tokens} calibration tokens, once")
    ctx.evaluator.warm(progress and is_main())
    if state is None and len(initial) > 1:
        log(f"ranking {len(initial)} initial candidates on {recipe.search.initial_tokens} tokens")
    track = _fixed_sample_track(ctx, log)
    final = ctx.pool.first(recipe.final_tokens)
    reference: dict[str, float] = {}

    def on_start(s: SearchState) -> None:
        if len(ctx.pool.names) > 1:  # the initial winner's per-source fitness, for the per-source aggregates
            reference.update(ctx.evaluator.set_reference(s.contenders[0], final))

    with _SearchProgress(recipe, state, progress, log) as report:
        def on_generation(s: SearchState) -> None:
            if track is not None and s.history and s.history[-1].track is None and \
                    (s.generation % recipe.track_every == 0 or s.generation == recipe.search.generations):
                s.history[-1].track, s.history[-1].track_sources = track(s.parent)
            if is_main():
                write_json(out / CHECKPOINT, {"fingerprint": fingerprint, "state": s.to_json()})
            report(s)

        try:
            state = evolve(ctx.space.problem, sharded(ctx.evaluator), initial, recipe.search, state, on_generation,
                           on_start=on_start)
        except NoMoveError as e:
            raise UserError(f"target {recipe.target} leaves nothing to search: {e}") from e
    config, measured, choice = _final_choice(ctx, state, final, log)
    history = [{k: v for k, v in asdict(h).items() if k != "parent"} for h in state.history]
    result = result_record(ctx, config, history, time.perf_counter() - start, measured)
    result["final_choice"] = choice
    if reference:
        result["reference_sources"] = reference
    if warm is not None:
        result["warm_start"] = warm.record
    if is_main():
        save_result(ctx.space, out, result)
    return result


def _final_choice(ctx: Context, state: SearchState, final: Sample, log: Callable[[str], None]
                  ) -> tuple[Config, Measurement, dict[str, Any]]:
    """The search's answer: the best on the final sample of its last parent, the parent with the best
    held-aside track score, and the initial contenders (the initial winner and those it did not clearly beat).

    Why: a parent that looked better on one small sample can replace a better one, and the last parent
    is then not the best the search held; and a search must never return something worse than where
    it started on its own final measure. The last parent wins ties. The chosen one's measurement is the
    result's final fitness (the same sample): it is not measured again.
    """
    named = {state.parent: "last parent"}
    tracked = [h for h in state.history if h.track is not None]
    if tracked:
        best = min(tracked, key=lambda h: h.track)
        named.setdefault(best.parent, f"best tracked parent (generation {best.generation})")
    for n, config in enumerate(state.contenders):
        named.setdefault(config, "initial winner" if n == 0 else "initial contender")
    configs = list(named)
    measured = ctx.evaluator.measure(configs, final)
    scores = [float(ctx.evaluator.fitness_of(m)) for m in measured]
    best = int(np.argmin(scores))
    chosen = configs[best]
    if chosen != state.parent:
        log(f"final choice: the {named[chosen]}, better on the final {final.tokens} tokens than the last parent")
    return chosen, measured[best], {"chosen": named[chosen], "tokens": final.tokens,
                    "candidates": [{"from": named[c], "fitness": s} for c, s in zip(configs, scores)]}


def _fixed_sample_track(ctx: Context, log: Callable[[str], None]
                        ) -> Callable[[Config], tuple[float, dict[str, float]]] | None:
    """The parent's fitness on one fixed sample of calibration windows held aside from the pool.

    Why: the fitness the search reports is measured on a fresh small sample each generation, so it
    jumps with the sample and does not show whether the search still improves. These windows come
    after the pool in the same seeded draw over the text, so the search never samples them. Cost:
    a teacher pass over them, then ``track_tokens`` candidate-tokens every ``track_every`` generations.
    """
    r = ctx.recipe
    if not r.track_every:
        return None
    more = load_pool(ctx.loaded.tokenizer, r.data, "calibration", r.seq_len, ctx.pool.tokens + r.track_tokens,
                     ctx.pool.bos)
    n = len(ctx.pool.windows)
    if len(more.windows) <= n or not torch.equal(more.windows[:n], ctx.pool.windows):
        log("fixed-sample track: off (no calibration text left beyond the pool)")
        return None
    held = more.tail(n)
    evaluator = Evaluator(ctx.space, held, r.fitness)
    evaluator.aggregate = ctx.evaluator.aggregate  # the same per-source reference as the search's fitness
    # its teacher now, while the model is still dense from the pool's pass: later, it would restore
    # every layer to dense mid-search and then put every level back
    evaluator.warm()
    sample = held.first(held.tokens)
    log(f"fixed-sample track: the parent on {held.tokens} held-aside calibration tokens every "
        f"{r.track_every} generations")

    def track(config: Config) -> tuple[float, dict[str, float]]:
        m = evaluator.measure([config], sample)[0]
        return float(evaluator.fitness_of(m)), evaluator.per_source(m)

    return track


def _initial_population(ctx: Context, fresh: bool, log: Callable[[str], None]) -> list[Config]:
    """The starting candidates, checked for room to search before the (long) teacher pass."""
    # A stream separate from the search's own, so the initial population does not shift its draws.
    rng = np.random.default_rng((ctx.recipe.search.seed, 1))
    initial = ctx.space.initial_configs(rng, ctx.recipe.search.initial_candidates)
    if fresh:
        initial = warm_start(ctx, initial, log)
    try:
        switch(list(initial[0]), ctx.space.problem, np.random.default_rng(0))
    except NoMoveError as e:
        raise UserError(f"target {ctx.recipe.target} leaves nothing to search: {e}") from e
    return initial


class _SearchProgress:
    """The progress bar of a search: generations, the parent's fitness, and short generations said aloud."""

    def __init__(self, recipe: Recipe, state: SearchState | None, progress: bool, log: Callable[[str], None]):
        from tqdm.auto import tqdm

        self.recipe, self.log = recipe, log
        self.bar = tqdm(total=recipe.search.generations, initial=state.generation if state else 0,
                        desc="search", unit="gen", disable=not progress or not is_main())

    def __enter__(self) -> Callable[[SearchState], None]:
        return self.update

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()

    def update(self, s: SearchState) -> None:
        if not s.history:
            return
        last, wanted = s.history[-1], self.recipe.search.offspring
        fitness = self.recipe.fitness
        postfix = {fitness.metric if fitness.aggregate == "tokens" else f"{fitness.metric} {fitness.aggregate}":
                   f"{last.fitness:.4f}"}
        tracked = [h.track for h in s.history if h.track is not None]
        if tracked:
            postfix["fixed"] = f"{tracked[-1]:.4f}"
        if last.children is not None and last.children < wanted:
            postfix["children"] = f"{last.children}/{wanted}"
            self.log(f"generation {last.generation}: only {last.children} of {wanted} offspring (mutation "
                     "found no more distinct feasible children)")
        self.bar.n = s.generation
        self.bar.set_postfix(postfix, refresh=True)


def warm_start(ctx: Context, initial: list[Config], log: Callable[[str], None]) -> list:
    """Add the configurations of the ``init_from`` baselines to the initial population.

    An entry that names a file adds the configuration it holds (``recipe.is_config_file``): e.g. a depth
    search's profile as a start of the width search. The paper starts from random configurations only;
    with a short search budget (CPU), starting the competition from the scoring methods' answers means
    the search can only improve on them (docs/speed.md). A baseline built in big steps (the joint space's
    uniform bitwidths and whole blocks) may miss the search's budget window: it is repaired into it by
    single-level moves (``Space.repair``, from its own random stream, so the result stays a function of
    the seed).
    """
    rng = np.random.default_rng((ctx.recipe.search.seed, 3))
    for method in ctx.recipe.init_from:
        if is_config_file(method):
            config = _feasible(ctx, method, _file_config(ctx, Path(method)), rng, log)
        else:
            baseline(ctx.recipe.space, method, "--init-from")
            config = _feasible(ctx, method, baseline_config(ctx, method)[0], rng, log)
        log(f"initial population: adding the '{method}' configuration")
        initial = initial + [config]
    return list(dict.fromkeys(initial))


def _file_config(ctx: Context, path: Path) -> Config:
    """The configuration a file gives (any layout the space reads, found as ``import-config`` finds it), not yet
    checked against the budget: ``_feasible`` repairs it like a baseline's."""
    space = ctx.space
    text = read_text(path)
    _, form = choose_format(ctx.recipe.space, text, None, str(path))
    return space.from_model_levels(form.read(text, space.model_space, str(path)))


def _feasible(ctx: Context, method: str, config: Config, rng: np.random.Generator,
              log: Callable[[str], None]) -> Config:
    """A warm-start configuration inside the budget: as it is, or repaired; refused if it cannot be."""
    problem = ctx.space.problem
    if problem.feasible(config):
        return config
    cost, low = problem.cost(config), problem.budget - problem.slack
    budget = f"{problem.budget:,}" if low == problem.budget else f"[{low:,}, {problem.budget:,}]"
    repaired = ctx.space.repair(config, rng)
    if repaired is None:
        raise UserError(f"--init-from {method}: its configuration costs {cost:,} and no single-level moves bring "
                        f"it to the search's budget {budget}; give --init-from without it (none: random only)")
    moved = sum(a != b for a, b in zip(config, repaired))
    log(f"initial population: the '{method}' configuration costs {cost:,}, outside the search's budget {budget}; "
        f"repaired to {problem.cost(repaired):,} by changing {moved} unit(s)")
    return repaired
