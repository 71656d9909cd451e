"""A run described as data: the ``Recipe``, and the one constructor every entry point goes through.

The CLI (flags), the Python API (keyword arguments), recipe files (YAML) and saved results
(``recipe.json``) all become a Recipe through ``make_recipe``, so they accept the same settings and
refuse the same mistakes with the same messages.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from .data import default_pool_tokens
from .errors import UserError
from .evolution import SearchConfig
from .fitness import FitnessConfig
from .spaces import DEFAULT_SPACE

IMPORTED = "imported"  # the method of a configuration found elsewhere (``import-config``)

# speed knobs older recipes may still carry; they never changed results, so they are dropped on load
_RETIRED_FITNESS_KEYS = ("logit_cache_bytes",)


@dataclass
class Recipe:
    """Everything that determines a run's result."""

    space: str = DEFAULT_SPACE
    target: float = 0.25
    method: str = "evopress"
    model: str | None = None  # None: the embedded default
    data: str = "wiki"
    device: str | None = None
    dtype: str | None = None
    seq_len: int = 256
    calib_tokens: int | None = None  # the calibration pool; None: sized from the schedule (``pool_tokens``)
    space_options: dict[str, Any] = field(default_factory=dict)
    search: SearchConfig = field(default_factory=SearchConfig)
    fitness: FitnessConfig = field(default_factory=FitnessConfig)
    final_tokens: int = 4096  # the shared calibration sample every method's final fitness is reported on
    baseline_tokens: int = 4096  # tokens the scoring baselines and best-of-N random look at
    random_candidates: int = 32
    init_from: list[str] = field(default_factory=list)  # baselines whose configurations join the initial population

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> "Recipe":
        return make_recipe(d)

    def largest_stage(self) -> int:
        """Tokens of the largest selection-stage sample; 0 when the run is not a search."""
        return max(t for _, t in self.search.stages) if self.method == "evopress" else 0

    def samples(self) -> dict[str, int]:
        """The calibration samples this run draws, keyed by the setting that sizes each (for messages)."""
        if self.method == IMPORTED:
            return {"--final-tokens": self.final_tokens}
        if self.method != "evopress":
            return {"--final-tokens": self.final_tokens, "--tokens": self.baseline_tokens}
        sizes = {"the largest --stages sample": self.largest_stage(), "--initial-tokens": self.search.initial_tokens,
                 "--final-tokens": self.final_tokens}
        if self.init_from:
            sizes["the --init-from baselines' sample (baseline_tokens)"] = self.baseline_tokens
        return sizes

    def pool_tokens(self) -> int:
        """The calibration pool to load: ``calib_tokens``, or when unset a size that fits the schedule."""
        if self.calib_tokens is not None:
            return self.calib_tokens
        return default_pool_tokens(self.samples(), self.largest_stage())

    def fingerprint(self) -> str:
        """What a resumed run must share with the checkpoint (device, dtype and speed knobs excluded)."""
        d = self.to_json()
        for k in ("device",):
            d.pop(k)
        for k in ("batch_size", "chunk_tokens", "prefix_reuse", "cache_bytes"):
            d["fitness"].pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _split(settings: dict[str, Any], cls: type) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: settings.pop(k) for k in list(settings) if k in names}


def make_recipe(mapping: Mapping[str, Any] | None = None, /, **settings: Any) -> Recipe:
    """A checked Recipe from a mapping and/or keyword arguments.

    Search and fitness settings may be nested (``search: {...}``, as in recipe files and
    recipe.json) or given flat at top level (as the Python API takes them).
    """
    settings = {**(mapping or {}), **settings}
    search = {**(settings.pop("search", None) or {}), **_split(settings, SearchConfig)}
    fitness = {**(settings.pop("fitness", None) or {}), **_split(settings, FitnessConfig)}
    fitness = {k: v for k, v in fitness.items() if k not in _RETIRED_FITNESS_KEYS}
    if "stages" in search:
        search["stages"] = [tuple(s) for s in search["stages"]]
    try:
        recipe = Recipe(**settings, search=SearchConfig(**search), fitness=FitnessConfig(**fitness))
    except TypeError as e:
        raise UserError(f"bad recipe: {e}") from e
    recipe.search.validate()
    for name in ("calib_tokens", "final_tokens", "baseline_tokens"):
        value = getattr(recipe, name)
        if value is not None and value < 1:
            raise UserError(f"{name} must be a positive number of tokens, not {value}")
    if recipe.fitness.cache_bytes < 0:
        raise UserError("--prefix-cache-gb must be >= 0")
    return recipe
