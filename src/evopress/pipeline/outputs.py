"""A run's output directory: its files, the claim on it, and reading a result back.

``result.json`` and ``recipe.json`` describe a finished run, ``checkpoint.json`` a search in progress,
``config.txt`` the configuration as text. A run claims its ``--out`` before the model loads: locked,
writable, and not another run's result or checkpoint unless ``--restart``.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..distributed import from_main
from ..errors import UserError
from ..evaluate import EVAL
from ..evolution import SearchState
from ..fitness import Measurement
from ..interchange import write_config
from ..io import locked_dir, read_json, write_json
from ..models import Hardware, LoadedModel
from ..recipe import IMPORTED, Recipe
from ..spaces import Space, make_space
from ..spaces.problem import Config
from ..version import __version__
from .context import Context

RESULT = "result.json"
CHECKPOINT = "checkpoint.json"
RECIPE = "recipe.json"
CONFIG_TXT = "config.txt"
EXPORTED = "evopress_export.json"  # the files an export wrote into its --out (io.owned_dir)


def final_fitness(ctx: Context, config: Config, measured: Measurement | None = None) -> dict[str, Any]:
    """The final calibration fitness; ``measured``: ``config`` already measured on the final sample."""
    sample = ctx.pool.first(ctx.recipe.final_tokens)
    m = measured or ctx.evaluator.measure([config], sample)[0]
    return {"metric": ctx.recipe.fitness.metric, "kl": m.kl, "nll": m.nll, "dense_nll": m.dense_nll,
            "sources": ctx.evaluator.per_source(m), "tokens": sample.tokens,
            "sample": f"first {sample.tokens} calibration tokens (same for every method)"}


def result_record(ctx: Context, config: Config, history: list[dict], seconds: float,
                  measured: Measurement | None = None) -> dict[str, Any]:
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
        "fitness": final_fitness(ctx, config, measured),
        "history": history,
        "seconds": seconds,
        "recipe": r.to_json(),
    }


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
