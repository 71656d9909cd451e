"""Python API mirroring the CLI: ``evopress.search(...)``, ``evopress.baseline(...)``, ``evopress.run(recipe)``.

    import evopress
    result = evopress.search(space="drop", target=0.25, out="runs/api", generations=10)
    print(result.fitness["kl"], result.profile)

Every call writes the same files as the CLI (result.json, recipe.json, checkpoint.json) into ``out``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from .errors import UserError
from .fitness import FitnessConfig
from .evolution import SearchConfig


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


def _split(kwargs: dict[str, Any], cls: type) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: kwargs.pop(k) for k in list(kwargs) if k in names}


def make_recipe(**kwargs: Any):
    """A Recipe from flat keyword arguments: search and fitness settings may be given at top level."""
    from .pipeline import Recipe

    search = {**kwargs.pop("search", {}), **_split(kwargs, SearchConfig)}
    fitness = {**kwargs.pop("fitness", {}), **_split(kwargs, FitnessConfig)}
    if "stages" in search:
        search["stages"] = [tuple(s) for s in search["stages"]]
    try:
        return Recipe(**kwargs, search=SearchConfig(**search), fitness=FitnessConfig(**fitness))
    except TypeError as e:
        raise UserError(f"bad recipe: {e}") from e


def run(recipe: Any, out: str | Path, restart: bool = False, progress: bool = True,
        log: Callable[[str], None] = print) -> Result:
    """Run a Recipe (or a dict / YAML path describing one): a search or a baseline, by ``method``."""
    from . import pipeline

    if isinstance(recipe, (str, Path)):
        recipe = load_recipe_file(Path(recipe))
    if isinstance(recipe, dict):
        recipe = make_recipe(**recipe)
    recipe.search.validate()
    ctx = pipeline.prepare(recipe, log)
    if recipe.method == "evopress":
        data = pipeline.run_search(ctx, Path(out), restart=restart, progress=progress, log=log)
    else:
        data = pipeline.run_baseline(ctx, Path(out), log)
    return Result(Path(out), data)


def search(out: str | Path, space: str = "drop", target: float = 0.25, progress: bool = True,
           log: Callable[[str], None] = print, **settings: Any) -> Result:
    """EvoPress search; ``settings`` are Recipe, SearchConfig or FitnessConfig fields, flat."""
    return run(make_recipe(space=space, target=target, method="evopress", **settings), out,
               progress=progress, log=log)


def baseline(out: str | Path, method: str, space: str = "drop", target: float = 0.25,
             log: Callable[[str], None] = print, **settings: Any) -> Result:
    return run(make_recipe(space=space, target=target, method=method, **settings), out, log=log)


def load_yaml(path: Path, what: str) -> Any:
    import yaml

    if not Path(path).is_file():
        raise UserError(f"{what} file {path} not found")
    try:
        return yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{what} file {path} is not valid YAML: {str(e).splitlines()[0]}") from e


def load_recipe_file(path: Path) -> dict[str, Any]:
    """YAML (or JSON, which is YAML) describing a run; the ``out`` and ``eval`` keys are for the runner."""
    data = load_yaml(path, "recipe")
    if not isinstance(data, dict):
        raise UserError(f"recipe {path} must be a mapping of settings")
    return data
