"""One run, end to end: resolve a recipe, load model and data, search or baseline, write results.

The CLI and the Python API are thin layers over these functions; a ``Recipe`` is the whole
description of a run and is written, fully resolved, next to every result.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .data import TokenPool, check_samples, load_pool
from .distributed import ShardedEvaluator, is_main, world_size
from .evaluate import EvalSettings, HeldOut, lm_eval_tasks, write_eval
from .errors import UserError
from .fitness import Evaluator, FitnessConfig
from .interchange import parse_config, write_config
from .io import read_json, write_json
from .models import Decoder, LoadedModel, load_model, resolve_device, resolve_dtype
from .evolution import NoMoveError, SearchConfig, SearchState, evolve
from .recipe import Recipe
from .spaces import Space, baselines, get_plugin, make_space
from .spaces.base import BaselineInputs, Config
from .version import __version__

RESULT = "result.json"
CHECKPOINT = "checkpoint.json"
RECIPE = "recipe.json"
CONFIG_TXT = "config.txt"


@dataclass
class Context:
    recipe: Recipe
    loaded: LoadedModel
    decoder: Decoder
    pool: TokenPool
    space: Space
    evaluator: Evaluator


def prepare(recipe: Recipe, log: Callable[[str], None] = print) -> Context:
    """Model, space and calibration pool of a run; ``Context.recipe`` holds the pool size it resolved to.

    The samples are checked against the pool before the model loads (the pool size is in the recipe);
    a text too short for it is only known once tokenized, and is refused or warned about then.
    """
    check_samples(recipe.samples(), recipe.largest_stage(), recipe.pool_tokens(),
                  "the calibration pool", log)
    device = resolve_device(recipe.device)
    dtype = resolve_dtype(recipe.dtype, device)
    loaded = load_model(recipe.model, device, dtype)
    decoder = loaded.decoder
    space = make_space(recipe.space, decoder, recipe.target, recipe.space_options)
    pool, recipe = _calibration_pool(recipe, loaded.tokenizer, log)
    space.check_calibration(pool)
    log(f"model {loaded.name}: {decoder.num_blocks} blocks on {device} ({dtype}); calibration "
        f"{pool.tokens} tokens of '{recipe.data}' in {len(pool.windows)} windows of {pool.seq_len}, "
        "drawn across the whole text")
    return Context(recipe, loaded, decoder, pool, space, Evaluator(space, pool, recipe.fitness))


def _calibration_pool(recipe: Recipe, tokenizer: Any, log: Callable[[str], None]) -> tuple[TokenPool, Recipe]:
    """The pool, and the recipe with ``calib_tokens`` resolved so that recipe.json reruns the same pool.

    A pool the text cannot fill is refused when ``--calib-tokens`` asked for it; the default pool
    shrinks to the whole text, as long as every sample still fits.
    """
    want = recipe.pool_tokens()
    pool = load_pool(tokenizer, recipe.data, "calibration", recipe.seq_len, want)
    if pool.tokens < want:
        holder = f"all of data '{recipe.data}' in windows of {pool.seq_len}"
        if recipe.calib_tokens is not None:
            raise UserError(f"--calib-tokens {want} is more than {holder} ({pool.tokens} tokens); give "
                            f"--calib-tokens {pool.tokens} or less, or more text")
        check_samples(recipe.samples(), recipe.largest_stage(), pool.tokens, holder, log)
    return pool, replace(recipe, calib_tokens=min(want, pool.tokens))


def _final_fitness(ctx: Context, config: Config) -> dict[str, Any]:
    sample = ctx.pool.first(ctx.recipe.final_tokens)
    m = ctx.evaluator.measure([config], sample)[0]
    return {"metric": ctx.recipe.fitness.metric, "kl": m.kl, "nll": m.nll, "dense_nll": m.dense_nll,
            "tokens": sample.tokens, "sample": f"first {sample.tokens} calibration tokens (same for every method)"}


def _result(ctx: Context, config: Config, history: list[dict], seconds: float) -> dict[str, Any]:
    r = ctx.recipe
    return {
        "evopress_version": __version__,
        "space": r.space,
        "method": r.method,
        "target": r.target,
        "model": ctx.loaded.name,
        "data": r.data,
        "seed": r.search.seed,
        "space_options": ctx.space.options(),
        "units": ctx.space.model_space.units,
        "levels": list(ctx.space.to_model_levels(config)),
        "budget": ctx.space.budget_report(config),
        "fitness": _final_fitness(ctx, config),
        "history": history,
        "seconds": seconds,
        "recipe": r.to_json(),
    }


def run_search(ctx: Context, out: Path, restart: bool = False, progress: bool = True,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """EvoPress search with a checkpoint after every generation; rerunning resumes it."""
    from tqdm.auto import tqdm

    recipe = ctx.recipe
    out = Path(out)
    fingerprint = recipe.fingerprint()
    state = None
    checkpoint = out / CHECKPOINT
    if checkpoint.is_file() and not restart:
        saved = read_json(checkpoint)
        if saved.get("fingerprint") != fingerprint:
            raise UserError(f"{out} holds a search with different settings; use another --out or --restart")
        state = SearchState.from_json(saved["state"])
        log(f"resuming from generation {state.generation}")
    if is_main():
        write_json(out / RECIPE, recipe.to_json())
    start = time.perf_counter()
    bar = tqdm(total=recipe.search.generations, initial=state.generation if state else 0,
               desc="search", unit="gen", disable=not progress or not is_main())

    def on_generation(s: SearchState) -> None:
        if is_main():
            write_json(checkpoint, {"fingerprint": fingerprint, "state": s.to_json()})
        if s.history:
            bar.n = s.generation
            bar.set_postfix({recipe.fitness.metric: f"{s.history[-1].fitness:.4f}"}, refresh=True)

    # A stream separate from the search's own, so the initial population does not shift its draws.
    rng = np.random.default_rng((recipe.search.seed, 1))
    initial = ctx.space.initial_configs(rng, recipe.search.initial_candidates)
    if state is None:
        initial = _warm_start(ctx, initial, log)
    log(f"teacher: the dense model over all {ctx.pool.tokens} calibration tokens, once")
    ctx.evaluator.warm()
    try:
        evaluator = ShardedEvaluator(ctx.evaluator) if world_size() > 1 else ctx.evaluator
        state = evolve(ctx.space.problem, evaluator, initial, recipe.search, state, on_generation)
    except NoMoveError as e:
        raise UserError(f"target {recipe.target} leaves nothing to search: {e}") from e
    bar.close()
    history = [{k: v for k, v in asdict(h).items() if k != "parent"} for h in state.history]
    result = _result(ctx, state.parent, history, time.perf_counter() - start)
    if is_main():
        save_result(ctx.space, out, result)
    return result


def _warm_start(ctx: Context, initial: list[Config], log: Callable[[str], None]) -> list:
    """Add the configurations of the ``init_from`` baselines to the initial population.

    The paper starts from random configurations only; with a short search budget (CPU), starting the
    competition from the scoring methods' answers means the search can only improve on them.
    """
    methods = baselines(ctx.recipe.space)
    for method in ctx.recipe.init_from:
        if method not in methods:
            raise UserError(f"--init-from: unknown method '{method}' for space '{ctx.recipe.space}' "
                            f"(choose from {', '.join(methods)})")
        log(f"initial population: adding the '{method}' configuration")
        initial = initial + [methods[method](baseline_inputs(ctx))]
    return list(dict.fromkeys(initial))


def baseline_inputs(ctx: Context) -> BaselineInputs:
    r = ctx.recipe
    return BaselineInputs(ctx.space, ctx.evaluator, ctx.pool, r.baseline_tokens, r.search.seed,
                          r.random_candidates, r.fitness.batch_size)


def run_baseline(ctx: Context, out: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    recipe = ctx.recipe
    start = time.perf_counter()
    methods = baselines(recipe.space)
    if recipe.method not in methods:
        raise UserError(f"unknown method '{recipe.method}' for space '{recipe.space}' "
                        f"(choose from {', '.join(methods)})")
    config = methods[recipe.method](baseline_inputs(ctx))
    result = _result(ctx, config, [], time.perf_counter() - start)
    write_json(Path(out) / RECIPE, recipe.to_json())
    save_result(ctx.space, Path(out), result)
    return result


def save_result(space: Space, out: Path, result: dict[str, Any]) -> None:
    """result.json plus the same configuration as a reference-style text config."""
    write_config(out / CONFIG_TXT, space.model_space, tuple(result["levels"]))
    write_json(out / RESULT, result)


def import_config(path: Path, recipe: Recipe, out: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """A configuration found elsewhere (text, one ``module: level`` per line) as an evopress result."""
    if not Path(path).is_file():
        raise UserError(f"config {path} not found")
    ctx = prepare(recipe, log)
    config = parse_config(Path(path).read_text(), ctx.space, str(path))
    result = _result(ctx, config, [], 0.0)
    write_json(Path(out) / RECIPE, ctx.recipe.to_json())
    save_result(ctx.space, Path(out), result)
    return result


def load_result(out: Path, device: str | None, dtype: str | None,
                loaded: LoadedModel | None = None) -> tuple[dict, LoadedModel, Space, Config]:
    """A saved result with its model loaded (or reused) and its space rebuilt, checked against each other."""
    result = read_json(Path(out) / RESULT)
    recipe = Recipe.from_json(result["recipe"])
    if loaded is None:
        dev = resolve_device(device or recipe.device)
        loaded = load_model(recipe.model, dev, resolve_dtype(dtype or recipe.dtype, dev))
    space = make_space(result["space"], loaded.decoder, result["target"], result["space_options"])
    units = space.model_space.units
    if list(units) != list(result["units"]) or len(result["levels"]) != len(units):
        raise UserError(f"{out}/{RESULT} does not match the units of model {loaded.name}")
    config = space.from_model_levels(tuple(result["levels"]))
    if not space.problem.feasible(config):
        raise UserError(f"{out}/{RESULT}: levels violate the budget of space '{result['space']}'")
    return result, loaded, space, config


@dataclass
class DatabaseRequest:
    """What ``build-db`` builds: a space's level database for one model and calibration text."""

    space: str
    out: Path
    options: dict[str, Any]  # the space's builder options
    model: str | None = None
    data: str = "wiki"
    device: str | None = None
    dtype: str | None = None
    seq_len: int = 256
    calib_tokens: int = 16384
    batch_size: int = 8


def build_database(request: DatabaseRequest, progress: bool = True,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    plugin = get_plugin(request.space)
    if plugin.build is None:
        raise UserError(f"space '{request.space}' needs no database")
    dev = resolve_device(request.device)
    loaded = load_model(request.model, dev, resolve_dtype(request.dtype, dev))
    pool = load_pool(loaded.tokenizer, request.data, "calibration", request.seq_len, request.calib_tokens)
    log(f"building a '{request.space}' database for {loaded.name} on {pool.tokens} tokens of '{request.data}'")
    start = time.perf_counter()
    manifest = plugin.build(loaded.decoder, pool, request.options, Path(request.out), request.batch_size, progress)
    log(f"database written to {request.out} in {time.perf_counter() - start:.0f} s")
    return manifest


def export_result(out: Path, target: Path, device: str | None = None, dtype: str | None = None,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    result, loaded, space, config = load_result(out, device, dtype)
    exporter = get_plugin(result["space"]).export
    if exporter is None:
        raise UserError(f"export is not supported for space '{result['space']}'")
    summary = exporter(space.model_space, space.to_model_levels(config), Path(target), loaded.tokenizer)
    log(f"exported {result['method']} {result['space']} {result['target']:g} to {target}")
    return summary


def evaluate_results(dirs: list[Path], settings: EvalSettings, device: str | None = None,
                     dtype: str | None = None, log: Callable[[str], None] = print,
                     progress: bool = False) -> list[dict[str, Any]]:
    """Held-out PPL and KL for each saved result; results of one model share the model and teachers."""
    from tqdm.auto import tqdm

    # every directory is checked before the first (long) evaluation: a typo fails at once
    models = [Recipe.from_json(read_json(Path(out) / RESULT)["recipe"]).model for out in dirs]
    reports = []
    loaded: LoadedModel | None = None
    held_out: HeldOut | None = None
    for out, model in zip(tqdm(dirs, desc="eval", unit="result", disable=not progress), models):
        if loaded is not None and model != loaded.name and not (model is None and loaded.name == "default"):
            loaded = held_out = None
        result, loaded, space, config = load_result(out, device, dtype, loaded)
        held_out = held_out or HeldOut(loaded, loaded.decoder, settings)
        extra = {"lm_eval": lm_eval_tasks(loaded, space, config, settings)} if settings.lm_eval else None
        reports.append(write_eval(Path(out), result, held_out.measure(space, config), log, extra))
    return reports
