"""Python API mirroring the CLI: ``evopress.search(...)``, ``evopress.baseline(...)``, ``evopress.pareto(...)``,
``evopress.run(recipe)``.

    import evopress
    result = evopress.search(space="drop", target=0.25, out="runs/api", generations=10)
    print(result.fitness["kl"], result.profile)

Every call writes the same files as the CLI (result.json, recipe.json, checkpoint.json) into ``out``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .errors import UserError
from .recipe import Recipe, make_recipe
from .spaces import DEFAULT_SPACE

if TYPE_CHECKING:
    from .evaluate import EvalSettings


@dataclass
class Result:
    """A finished run: its configuration and scores, plus the directory holding its files."""

    out: Path
    data: dict[str, Any] = field(repr=False)

    @property
    def levels(self) -> list[int]:
        return self.data["levels"]

    @property
    def units(self) -> list[str]:
        return self.data["units"]

    @property
    def fitness(self) -> dict[str, Any]:
        return self.data["fitness"]

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.data["history"]

    @property
    def profile(self) -> dict[str, int]:
        return dict(zip(self.units, self.levels))


def run(recipe: Any, out: str | Path | None = None, restart: bool = False, progress: bool = True,
        log: Callable[[str], None] = print) -> Result:
    """Run a Recipe (or a dict / YAML path describing one): a search or a baseline, by ``method``.

    A recipe file's ``out`` is used when ``out`` is not given. Its ``finalize`` section, if any
    (``{out: DIR, calib_tokens: N}``, both optional; default out ``<out>-finalized``), re-solves the
    result's levels (``evopress finalize``; ``Result.data["finalized"]`` is that result), and its ``eval``
    section, if any, is run on the result, the finalized one when there is one
    (``Result.data["eval"]``): the same as ``evopress run FILE``.

    Under torchrun (a script started by ``torchrun --nproc-per-node N``) the N processes make one run:
    candidates are split between them, every rank returns the same result, rank 0 alone writes ``out``
    and runs the ``eval`` section (the other ranks' results have no ``"eval"``).
    """
    from . import distributed

    recipe, out, settings, finalize = _resolve(recipe, out)
    with distributed.session():
        distributed.agree({"settings": recipe.identity(), "the output directory": str(out), "restart": restart})
        log = distributed.main_only(log)
        data = _search_or_baseline(replace(recipe, device=distributed.local_device() or recipe.device), out,
                                   restart, progress, log)
        if not distributed.is_main():
            return Result(out, data)
        evaluated = out
        if finalize is not None:
            from .pipeline.finalize import finalize_result, finalized_dir

            evaluated = Path(finalize.get("out") or finalized_dir(out))
            data = {**data, "finalized": finalize_result(out, evaluated, recipe.hardware, finalize.get("calib_tokens"),
                                                         log=log, progress=progress)}
        if settings is not None:
            from .pipeline import evaluate_results

            data = {**data, "eval": evaluate_results([evaluated], settings, log=log)[0]}
    return Result(out, data)


def _resolve(recipe: Any, out: str | Path | None
             ) -> tuple[Recipe, Path, EvalSettings | None, dict[str, Any] | None]:
    """The Recipe, the output directory, the eval settings and the finalize section (each or None) that
    ``run`` was given."""
    if isinstance(recipe, (str, Path)):
        recipe = load_recipe_file(Path(recipe))
    evaluation = finalize = None
    if not isinstance(recipe, Recipe):
        recipe = dict(recipe)
        out = out or recipe.pop("out", None)
        recipe.pop("out", None)
        evaluation = recipe.pop("eval", None)
        finalize = _finalize_section(recipe.pop("finalize", None))
        recipe = make_recipe(recipe)
    if out is None:
        raise UserError("no output directory: give out=... (--out) or an 'out' key in the recipe")
    return recipe, Path(out), _eval_settings(evaluation) if evaluation is not None else None, finalize


def _finalize_section(section: Any) -> dict[str, Any] | None:
    """The recipe's ``finalize`` section: None (absent or false), or its settings (``true``: the defaults)."""
    if section is None or section is False:
        return None
    section = {} if section is True else section
    if not isinstance(section, dict) or set(section) - {"out", "calib_tokens"}:
        raise UserError("the recipe's 'finalize' section must be true or a mapping with 'out' and/or "
                        f"'calib_tokens', not {section!r}")
    return section


def _search_or_baseline(recipe: Recipe, out: Path, restart: bool, progress: bool,
                        log: Callable[[str], None]) -> dict[str, Any]:
    from . import pipeline

    with pipeline.claim_output(out, recipe, restart):
        ctx = pipeline.prepare(recipe, log)
        if recipe.method == "evopress":
            return pipeline.run_search(ctx, out, restart=restart, progress=progress, log=log)
        return pipeline.run_baseline(ctx, out, log)


def _eval_settings(section: Any) -> EvalSettings:
    from .evaluate import EvalSettings

    if not isinstance(section, dict):
        raise UserError("the recipe's 'eval' section must be a mapping (data, tokens, seq_len, ...)")
    try:
        return EvalSettings(**section)
    except TypeError as e:
        raise UserError(f"bad 'eval' section in the recipe ({e})") from e


def search(out: str | Path, space: str = DEFAULT_SPACE, target: float = 0.25, progress: bool = True,
           log: Callable[[str], None] = print, **settings: Any) -> Result:
    """EvoPress search; ``settings`` are Recipe, SearchConfig or FitnessConfig fields, flat.

    As on the command line, ``init_from`` defaults to ``"auto"`` (the space's own warm start);
    ``init_from="none"`` is the paper's random initial population."""
    return run(make_recipe(space=space, target=target, method="evopress", **settings), out,
               progress=progress, log=log)


def baseline(out: str | Path, method: str, space: str = DEFAULT_SPACE, target: float = 0.25,
             log: Callable[[str], None] = print, **settings: Any) -> Result:
    return run(make_recipe(space=space, target=target, method=method, **settings), out, log=log)


def pareto(out: str | Path, targets: Sequence[float], space: str = DEFAULT_SPACE,
           baselines: Sequence[str] | None = None, eval_data: Sequence[str] = ("wiki", "ptb"),
           eval_tokens: int = 16384, eval_seq_len: int = 512,
           restart: bool = False, progress: bool = True, log: Callable[[str], None] = print,
           **settings: Any) -> dict[str, Any]:
    """Search every target (ascending) and run ``baselines`` (default: the space's own) there, in one process;
    returns front.json's content. ``settings`` are those of ``search``; the same files as ``evopress pareto``."""
    from .evaluate import EvalSettings
    from .front import ParetoSettings, check_targets, run_pareto

    check_targets(list(targets))
    recipe = make_recipe(space=space, target=targets[0], method="evopress", **settings)
    evaluation = EvalSettings(list(eval_data), eval_tokens, eval_seq_len, bos=recipe.bos)
    return run_pareto(recipe, ParetoSettings(list(targets), None if baselines is None else list(baselines), evaluation),
                      Path(out), restart=restart, progress=progress, log=log)


def load_yaml(path: Path, what: str) -> Any:
    import yaml

    if not Path(path).is_file():
        raise UserError(f"{what} file {path} not found")
    try:
        return yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{what} file {path} is not valid YAML: {str(e).splitlines()[0]}") from e


def load_recipe_file(path: Path) -> dict[str, Any]:
    """YAML (or JSON, which is YAML) describing a run; the ``out``, ``finalize`` and ``eval`` keys are for the
    runner."""
    data = load_yaml(path, "recipe")
    if not isinstance(data, dict):
        raise UserError(f"recipe {path} must be a mapping of settings")
    return data
