"""One run, end to end: resolve a recipe, load model and data, search or baseline, write results.

The CLI and the Python API are thin layers over these functions; a ``Recipe`` is the whole
description of a run and is written, fully resolved, next to every result.
"""

from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .data import DEFAULT_CALIBRATION, TokenPool, bos_token, check_samples, check_source, load_pool
from .distributed import from_main, is_main, sharded
from .evaluate import EVAL, EvalSettings, HeldOut, lm_eval_tasks, write_eval
from .errors import UserError
from .fitness import Evaluator
from .hostmem import trim_heap
from .interchange import (choose_format, format_config, get_format, implied_target, parse_config, read_text,
                          write_config)
from .io import locked_dir, owned_dir, read_json, write_json
from .models import Decoder, Hardware, LoadedModel
from .evolution import SearchState, evolve
from .recipe import IMPORTED, Recipe, check_inputs, make_recipe
from .spaces import Space, baseline, get_plugin, make_space
from .spaces.plugin import BaselineInputs
from .spaces.problem import Config, NoMoveError, switch
from .version import __version__

RESULT = "result.json"
CHECKPOINT = "checkpoint.json"
RECIPE = "recipe.json"
CONFIG_TXT = "config.txt"
EXPORTED = "evopress_export.json"  # the files an export wrote into its --out (io.owned_dir)


@dataclass
class Context:
    recipe: Recipe
    loaded: LoadedModel
    decoder: Decoder
    pool: TokenPool
    space: Space
    evaluator: Evaluator
    # baseline configurations made on this context, and their seconds: ``baseline_config``
    baseline_runs: dict[tuple, tuple[Config, float]] = field(default_factory=dict)


def prepare(recipe: Recipe, log: Callable[[str], None] = print, loaded: LoadedModel | None = None,
            summary: Callable[[str], None] | None = None) -> Context:
    """Model, space and calibration pool of a run; ``summary`` takes the line saying so (default: ``log``).

    The samples are checked against the pool before the model loads (the pool size is in the recipe),
    and so are the text and database named; a text too short for the pool is only known once
    tokenized, and is refused or warned about then.
    """
    check_inputs(recipe)
    check_samples(recipe.samples(), recipe.largest_stage(), recipe.pool_tokens(),
                  "the calibration pool", log)
    loaded = loaded or recipe.hardware.load(recipe.model, log)
    decoder = loaded.decoder
    # the pool before the space: tokenizing's temporaries (a few hundred MB of heap, handed back after)
    # then add to a model not yet fully paged in and no database cache (benchmarks/memory_phases.py)
    pool = _calibration_pool(recipe, loaded.tokenizer, log)
    trim_heap()
    space = make_space(recipe.space, decoder, recipe.target, recipe.space_options)
    space.check_calibration(pool)
    (summary or log)(
        f"model {loaded.name}: {decoder.num_blocks} blocks, head on {decoder.device} ({decoder.head.weight.dtype}); "
        f"calibration {pool.tokens} tokens of '{recipe.data}' in {len(pool.windows)} windows of {pool.seq_len}, "
        "drawn across the whole text" + ("" if pool.bos is None else f", each starting with BOS ({pool.bos})"))
    return Context(recipe, loaded, decoder, pool, space, Evaluator(space, pool, recipe.fitness))


def retarget(ctx: Context, recipe: Recipe) -> Context:
    """The context of another recipe on the same model and calibration pool (another target, method).

    The model is restored to dense first: a space reads the dense weights it will restore when built.
    The same space with the same options is retargeted (``make_space(reuse=...)``): a level database
    stays open and checked, its caches warm. The new evaluator shares the teacher cache, whose entries
    depend only on the model and the pool.
    """
    if recipe.pool_tokens() != ctx.recipe.pool_tokens() or recipe.data != ctx.recipe.data:
        raise ValueError("retarget keeps the calibration pool: the recipes must draw the same one")
    ctx.space.apply(None)
    same = (recipe.space, recipe.space_options) == (ctx.recipe.space, ctx.recipe.space_options)
    space = make_space(recipe.space, ctx.decoder, recipe.target, recipe.space_options,
                       reuse=ctx.space if same else None)
    space.check_calibration(ctx.pool)
    return Context(recipe, ctx.loaded, ctx.decoder, ctx.pool, space,
                   Evaluator(space, ctx.pool, recipe.fitness, teacher=ctx.evaluator.teacher))


def _calibration_pool(recipe: Recipe, tokenizer: Any, log: Callable[[str], None]) -> TokenPool:
    """The calibration pool; refused when ``--calib-tokens`` asked for more than the text holds.

    The default pool (``calib_tokens`` unset) shrinks to the whole text, as long as every sample
    still fits. It stays unset in the recipe: it is a function of the schedule and the text, so a
    rerun of recipe.json draws the same pool, and a resumed run's fingerprint matches its checkpoint.
    result.json records the pool's size.
    """
    want = recipe.pool_tokens()
    pool = load_pool(tokenizer, recipe.data, "calibration", recipe.seq_len, want, bos_token(tokenizer, recipe.bos))
    if pool.tokens < want:
        holder = f"all of data '{recipe.data}' in windows of {pool.seq_len}"
        if recipe.calib_tokens is not None:
            raise UserError(f"--calib-tokens {want} is more than {holder} ({pool.tokens} tokens); give "
                            f"--calib-tokens {pool.tokens} or less, or more text")
        check_samples(recipe.samples(), recipe.largest_stage(), pool.tokens, holder, log)
    return pool


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
        "calibration_tokens": ctx.pool.tokens,
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
    with _SearchProgress(recipe, state, progress, log) as report:
        def on_generation(s: SearchState) -> None:
            if track is not None and s.history and s.history[-1].track is None and \
                    (s.generation % recipe.track_every == 0 or s.generation == recipe.search.generations):
                s.history[-1].track = track(s.parent)
            if is_main():
                write_json(out / CHECKPOINT, {"fingerprint": fingerprint, "state": s.to_json()})
            report(s)

        try:
            state = evolve(ctx.space.problem, sharded(ctx.evaluator), initial, recipe.search, state, on_generation)
        except NoMoveError as e:
            raise UserError(f"target {recipe.target} leaves nothing to search: {e}") from e
    history = [{k: v for k, v in asdict(h).items() if k != "parent"} for h in state.history]
    result = _result(ctx, state.parent, history, time.perf_counter() - start)
    if warm is not None:
        result["warm_start"] = warm.record
    if is_main():
        save_result(ctx.space, out, result)
    return result


def _fixed_sample_track(ctx: Context, log: Callable[[str], None]) -> Callable[[Config], float] | None:
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
    held = TokenPool(more.windows[n:], r.data, more.bos)
    evaluator = Evaluator(ctx.space, held, r.fitness)
    # its teacher now, while the model is still dense from the pool's pass: later, it would restore
    # every layer to dense mid-search and then put every level back
    evaluator.warm()
    sample = held.first(held.tokens)
    log(f"fixed-sample track: the parent on {held.tokens} held-aside calibration tokens every "
        f"{r.track_every} generations")
    return lambda config: evaluator.score([config], sample)[0]


def _initial_population(ctx: Context, fresh: bool, log: Callable[[str], None]) -> list[Config]:
    """The starting candidates, checked for room to search before the (long) teacher pass."""
    # A stream separate from the search's own, so the initial population does not shift its draws.
    rng = np.random.default_rng((ctx.recipe.search.seed, 1))
    initial = ctx.space.initial_configs(rng, ctx.recipe.search.initial_candidates)
    if fresh:
        initial = _warm_start(ctx, initial, log)
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
        postfix = {self.recipe.fitness.metric: f"{last.fitness:.4f}"}
        tracked = [h.track for h in s.history if h.track is not None]
        if tracked:
            postfix["fixed"] = f"{tracked[-1]:.4f}"
        if last.children is not None and last.children < wanted:
            postfix["children"] = f"{last.children}/{wanted}"
            self.log(f"generation {last.generation}: only {last.children} of {wanted} offspring (mutation "
                     "found no more distinct feasible children)")
        self.bar.n = s.generation
        self.bar.set_postfix(postfix, refresh=True)


def _warm_start(ctx: Context, initial: list[Config], log: Callable[[str], None]) -> list:
    """Add the configurations of the ``init_from`` baselines to the initial population.

    The paper starts from random configurations only; with a short search budget (CPU), starting the
    competition from the scoring methods' answers means the search can only improve on them
    (docs/speed.md). A baseline built in big steps (the joint space's uniform bitwidths and whole
    blocks) may miss the search's budget window: it is repaired into it by single-level moves
    (``Space.repair``, from its own random stream, so the result stays a function of the seed).
    """
    rng = np.random.default_rng((ctx.recipe.search.seed, 3))
    for method in ctx.recipe.init_from:
        baseline(ctx.recipe.space, method, "--init-from")
        config = _feasible(ctx, method, baseline_config(ctx, method)[0], rng, log)
        log(f"initial population: adding the '{method}' configuration")
        initial = initial + [config]
    return list(dict.fromkeys(initial))


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


def baseline_inputs(ctx: Context) -> BaselineInputs:
    r = ctx.recipe
    return BaselineInputs(ctx.space, sharded(ctx.evaluator), ctx.pool, r.baseline_tokens, r.search.seed,
                          r.random_candidates, r.fitness.windows_per_batch(ctx.pool.seq_len))


def baseline_config(ctx: Context, method: str) -> tuple[Config, float]:
    """A baseline's configuration on this context and the seconds it took to make, made once.

    Why: ``pareto`` warm-starts each budget's search from its baselines (``--init-from``) and then
    reports the same baselines on the front; a scoring baseline (quant DP measures every layer at every
    level) would otherwise run twice per budget. A context that shares this one's model, space, pool and
    budget (``dataclasses.replace`` with another recipe) shares the record; the key holds what else a
    baseline reads from the recipe.
    """
    inputs = baseline_inputs(ctx)
    key = (method, inputs.tokens, inputs.seed, inputs.candidates, inputs.batch_size)
    if key not in ctx.baseline_runs:
        start = time.perf_counter()
        config = baseline(ctx.recipe.space, method)(inputs)
        ctx.baseline_runs[key] = (config, time.perf_counter() - start)
    return ctx.baseline_runs[key]


def run_baseline(ctx: Context, out: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    recipe = ctx.recipe
    config, seconds = baseline_config(ctx, recipe.method)  # refuses an unknown method
    result = _result(ctx, config, [], seconds)
    if is_main():
        save_result(ctx.space, Path(out), result)
    return result


def save_result(space: Space, out: Path, result: dict[str, Any]) -> None:
    """result.json, its recipe, and the configuration as a reference-style text config.

    An eval.json left by an earlier result in the same directory describes another configuration:
    it is removed, so a report can never pair this result with another one's perplexity.
    """
    (out / EVAL).unlink(missing_ok=True)
    write_config(out / CONFIG_TXT, space.model_space, tuple(result["levels"]))
    write_json(out / RECIPE, result["recipe"])
    write_json(out / RESULT, result)


def load_checkpoint(out: Path, recipe: Recipe) -> SearchState | None:
    """The checkpointed search state in ``out``, if any; refused if made with other settings or malformed."""
    path = Path(out) / CHECKPOINT
    if not path.is_file():
        return None
    saved = read_json(path)
    if not isinstance(saved, dict) or "fingerprint" not in saved or not isinstance(saved.get("state"), dict):
        raise UserError(f"{path} is not an evopress checkpoint; remove it or use --restart")
    if saved["fingerprint"] != recipe.fingerprint():
        begun = _saved_recipe(read_json(Path(out) / RECIPE)) if (Path(out) / RECIPE).is_file() else None
        raise UserError(f"{out} holds a search with different settings{_differing(begun, recipe)}; use another "
                        "--out or --restart")
    try:
        return SearchState.from_json(saved["state"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path} is damaged ({type(e).__name__}: {e}); use --restart") from e


@contextmanager
def claim_output(out: Path, recipe: Recipe, restart: bool = False) -> Iterator[Path]:
    """Check and lock ``out`` before any model is loaded: writable, ours alone, not another run's result.

    A finished result made with other settings is never overwritten without ``restart`` (the same
    rule a search's checkpoint has always had). Under torchrun only rank 0 writes, so only it locks
    and checks; the other ranks share its verdict.
    """
    with ExitStack() as held:
        def claim() -> Path:
            path = held.enter_context(locked_dir(out))
            _check_output(path, recipe, restart)
            return path

        yield from_main(claim)


def _check_output(path: Path, recipe: Recipe, restart: bool) -> None:
    if not restart and (path / RESULT).is_file():
        saved = read_json(path / RESULT)
        made = _saved_recipe(saved.get("recipe") if isinstance(saved, dict) else None)
        if made is None or made.fingerprint() != recipe.fingerprint():
            raise UserError(f"{path} holds a result made with different settings{_differing(made, recipe)}; use "
                            "another --out or --restart")
    if not restart and (path / CHECKPOINT).is_file():
        load_checkpoint(path, recipe)


def _saved_recipe(data: Any) -> Recipe | None:
    if not isinstance(data, dict):
        return None
    try:
        return Recipe.from_json(data)
    except (UserError, KeyError, TypeError):
        return None


def _differing(saved: Recipe | None, recipe: Recipe) -> str:
    """Which settings a saved run had otherwise, for the refusal: ' (init_from differs)', or ''.

    Why: a default that changed (``init_from``'s warm start) makes an old run's rerun differ without
    the user changing anything; naming the setting says what to give to resume it.
    """
    if saved is None:
        return ""
    old, new = saved.identity(), recipe.identity()
    keys = [k for k in new if old.get(k) != new[k]]
    return f" ({', '.join(keys)} differ{'s' if len(keys) == 1 else ''})" if keys else ""


def import_config(path: Path, recipe: Recipe, out: Path, log: Callable[[str], None] = print,
                  fmt: str | None = None, restart: bool = False) -> dict[str, Any]:
    """A configuration found elsewhere (a text file in any format of the space, see interchange) as a result.

    ``fmt`` None: recognised from the text. ``recipe.target`` None: the file's own, so the model is
    loaded first to find it and ``out`` is claimed after; with a target it is claimed before. The
    model's summary is said once the file has parsed: a bad file is one line, alone.
    """
    check_inputs(recipe)
    text = read_text(path)
    name, form = choose_format(recipe.space, text, fmt, str(path))
    loaded = None
    if recipe.target is None:
        loaded = recipe.hardware.load(recipe.model, log)
        target = implied_target(text, form, recipe.space, loaded.decoder, recipe.space_options, str(path))
        recipe = make_recipe({**recipe.to_json(), "target": target})
    with claim_output(out, recipe, restart):
        said: list[str] = []
        ctx = prepare(recipe, log, loaded, summary=said.append)
        config = parse_config(text, ctx.space, str(path), form)
        for line in [f"read {path} as {name} (target {recipe.target:g})", *said]:
            log(line)
        result = _result(ctx, config, [], 0.0)
        save_result(ctx.space, Path(out), result)
    return result


def export_config(out: Path, fmt: str, hardware: Hardware = Hardware()) -> str:
    """A saved result's configuration as text in format ``fmt`` of its space (the format checked first)."""
    form = get_format(read_json(Path(out) / RESULT)["space"], fmt)
    _, _, space, config = load_result(out, hardware)
    return format_config(space, config, form)


def load_result(out: Path, hardware: Hardware = Hardware(),
                loaded: LoadedModel | None = None) -> tuple[dict, LoadedModel, Space, Config]:
    """A saved result with its model loaded (or reused) and its space rebuilt, checked against each other."""
    result = read_json(Path(out) / RESULT)
    recipe = Recipe.from_json(result["recipe"])
    if loaded is None:
        loaded = hardware.or_(recipe.hardware).load(recipe.model)
    space = make_space(result["space"], loaded.decoder, result["target"], result["space_options"])
    units = space.model_space.units
    if list(units) != list(result["units"]) or len(result["levels"]) != len(units):
        raise UserError(f"{out}/{RESULT} does not match the units of model {loaded.name}")
    config = space.from_model_levels(tuple(result["levels"]))
    p = space.problem
    if not (p.feasible(config) if result["method"] in ("evopress", IMPORTED) else p.admits_baseline(config)):
        raise UserError(f"{out}/{RESULT}: levels violate the budget of space '{result['space']}'")
    return result, loaded, space, config


@dataclass
class DatabaseRequest:
    """What ``build-db`` builds: a space's level database for one model and calibration text."""

    space: str
    out: Path
    options: dict[str, Any]  # the space's builder options
    model: str | None = None
    data: str = DEFAULT_CALIBRATION
    device: str | None = None
    dtype: str | None = None
    seq_len: int = 256
    calib_tokens: int = 16384
    batch_size: int = 8
    bos: str = "auto"
    device_map: str | None = None  # blocks spread or offloaded as in a search (placement.py)
    max_memory: str | None = None


def build_database(request: DatabaseRequest, progress: bool = True,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    plugin = get_plugin(request.space)
    if plugin.build is None:
        raise UserError(f"space '{request.space}' needs no database")
    check_source(request.data)
    loaded = Hardware(request.device, request.dtype, request.device_map, request.max_memory).load(request.model, log)
    pool = load_pool(loaded.tokenizer, request.data, "calibration", request.seq_len, request.calib_tokens,
                     bos_token(loaded.tokenizer, request.bos))
    start = time.perf_counter()  # the builder checks its options first: a refusal is its one line
    manifest = plugin.build(loaded.decoder, pool, request.options, Path(request.out), request.batch_size, progress)
    log(f"'{request.space}' database for {loaded.name} on {pool.tokens} tokens of '{request.data}' written to "
        f"{request.out} in {time.perf_counter() - start:.0f} s")
    return manifest


def export_result(out: Path, target: Path, hardware: Hardware = Hardware(),
                  log: Callable[[str], None] = print, fmt: str | None = None) -> dict[str, Any]:
    """Write a saved result as a checkpoint: the space's default layout, or its export format ``fmt``.

    ``target`` is claimed before the model loads (``io.owned_dir``): new, empty, or an earlier export
    (``EXPORTED`` lists its files, which this one replaces), never the model or a database the result
    reads; the files appear there only once all are written.
    """
    saved = read_json(Path(out) / RESULT)
    plugin = get_plugin(saved["space"])
    exporter = plugin.export if fmt is None else plugin.export_formats.get(fmt)
    if exporter is None:
        if plugin.export is None:
            raise UserError(f"export is not supported for space '{plugin.name}'")
        raise UserError(f"space '{plugin.name}' has no export format '{fmt}' "
                        f"(its formats: {', '.join(plugin.export_formats) or 'only the default'})")
    record = {"evopress_version": __version__, "result": str(Path(out).resolve()), "format": fmt}
    with owned_dir(target, EXPORTED, _read_dirs(saved), record=record) as stage:
        result, loaded, space, config = load_result(out, hardware)
        summary = exporter(space.model_space, space.to_model_levels(config), stage, loaded.tokenizer)
    log(f"exported {result['method']} {result['space']} {result['target']:g} to {target}"
        + (f" as {fmt}" if fmt else ""))
    return {k: v.replace(str(stage), str(target)) if isinstance(v, str) else v for k, v in summary.items()}


def _read_dirs(result: dict[str, Any]) -> dict[Path, str]:
    """The directories exporting ``result`` reads, which its --out must not be: the model it was searched
    on and its databases (the space options stored by absolute path)."""
    options = result.get("space_options") or {}
    reads = {Path(v): "a level database this result reads" for v in options.values()
             if isinstance(v, str) and Path(v).is_absolute()}
    model = (result.get("recipe") or {}).get("model")
    if model:
        reads[Path(model)] = "the model this result was searched on"
    return reads


def evaluate_results(dirs: list[Path], settings: EvalSettings, hardware: Hardware = Hardware(),
                     log: Callable[[str], None] = print, progress: bool = False) -> list[dict[str, Any]]:
    """Held-out PPL and KL for each saved result; results of one model share the model and teachers."""
    from tqdm.auto import tqdm

    # every directory and text is checked before the first (long) evaluation: a typo fails at once
    models = [Recipe.from_json(read_json(Path(out) / RESULT)["recipe"]).model for out in dirs]
    for source in settings.data:
        check_source(source)
    reports = []
    loaded: LoadedModel | None = None
    held_out: HeldOut | None = None
    bar = None  # shown once the first result is done: a mistake found on the way to it is one line, alone
    for out, model in zip(dirs, models):
        if loaded is not None and model != loaded.name and not (model is None and loaded.name == "default"):
            loaded = held_out = None
        result, loaded, space, config = load_result(out, hardware, loaded)
        held_out = held_out or HeldOut(loaded, loaded.decoder, settings)
        extra = {"lm_eval": lm_eval_tasks(loaded, space, config, settings)} if settings.lm_eval else None
        log(f"evaluating {out} ({result['method']}, {result['space']} {result['target']:g})")
        reports.append(write_eval(Path(out), result, held_out.measure(space, config, log), log, extra))
        bar = bar or tqdm(total=len(dirs), desc="eval", unit="result", disable=not progress)
        bar.update()
    if bar is not None:
        bar.close()
    return reports
