"""A run described as data: the ``Recipe``, and the one constructor every entry point goes through.

The CLI (flags), the Python API (keyword arguments), recipe files (YAML) and saved results
(``recipe.json``) all become a Recipe through ``make_recipe``, so they accept the same settings and
refuse the same mistakes with the same messages.
"""

from __future__ import annotations

import hashlib
import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from .data import DEFAULT_CALIBRATION, check_source, default_pool_tokens
from .data import BOS_POLICIES
from .database import MANIFEST
from .errors import UserError
from .evolution import SearchConfig
from .fitness import FitnessConfig
from .models import Hardware
from .spaces import DEFAULT_SPACE, baseline, check_space_settings, default_init, get_plugin
from .spaces.layerwise import DB_OPTION, absolute_path

IMPORTED = "imported"  # the method of a configuration found elsewhere (``import-config``)
AUTO, NO_INIT = "auto", "none"  # init_from: the space's default warm start; random only

# speed knobs older recipes may still carry; they never changed results, so they are dropped on load
_RETIRED_FITNESS_KEYS = ("logit_cache_bytes",)


@dataclass
class Recipe:
    """Everything that determines a run's result."""

    space: str = DEFAULT_SPACE
    target: float | None = 0.25  # None only for an imported configuration, until its file is read
    method: str = "evopress"
    model: str | None = None  # None: the embedded default
    data: str = DEFAULT_CALIBRATION
    device: str | None = None
    dtype: str | None = None
    device_map: str | None = None  # placement across devices / offload: never changes results
    max_memory: str | None = None
    seq_len: int = 256
    bos: str = "auto"  # BOS at the start of every window: auto (as the tokenizer does), always, never
    calib_tokens: int | None = None  # the calibration pool; None: sized from the schedule (``pool_tokens``)
    space_options: dict[str, Any] = field(default_factory=dict)
    search: SearchConfig = field(default_factory=SearchConfig)
    fitness: FitnessConfig = field(default_factory=FitnessConfig)
    final_tokens: int = 4096  # the shared calibration sample every method's final fitness is reported on
    baseline_tokens: int = 4096  # tokens the scoring baselines and best-of-N random look at
    random_candidates: int = 32
    # baselines whose configurations join a search's initial population: a list once made ('auto', the
    # space's default warm start, and 'none' are resolved by ``resolve_init``)
    init_from: list[str] | str = AUTO
    # a search's progress on one fixed calibration sample held aside from the pool (0: off); reporting only
    track_every: int = 5
    track_tokens: int = 2048

    def __post_init__(self) -> None:
        self.init_from = resolve_init(self.init_from, self.space, self.method, self.space_options)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def hardware(self) -> Hardware:
        return Hardware(self.device, self.dtype, self.device_map, self.max_memory)

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
        if not all(map(is_config_file, self.init_from)):  # a file's configuration looks at no tokens
            sizes["the --init-from baselines' sample (--tokens)"] = self.baseline_tokens
        return sizes

    def pool_tokens(self) -> int:
        """The calibration pool to load: ``calib_tokens``, or when unset a size that fits the schedule."""
        if self.calib_tokens is not None:
            return self.calib_tokens
        return default_pool_tokens(self.samples(), self.largest_stage())

    def identity(self) -> dict[str, Any]:
        """The settings that determine the result: all but placement and the speed knobs."""
        d = self.to_json()
        for k in ("device", "device_map", "max_memory", "track_every", "track_tokens"):
            d.pop(k)
        if d["bos"] == "auto":  # the default: fingerprints of recipes from before the setting are unchanged
            d.pop("bos")
        for k in ("batch_size", "batch_tokens", "chunk_tokens", "block_bytes", "prefix_reuse", "cache_bytes",
                  "teacher_device_bytes", "profile"):
            d["fitness"].pop(k)
        # what every run did before these settings existed: such a recipe keeps its fingerprint
        if d["fitness"]["aggregate"] == "tokens":
            d["fitness"].pop("aggregate")
        if d["search"]["accept_sigmas"] == 0:
            d["search"].pop("accept_sigmas")
        return d

    def fingerprint(self) -> str:
        """What a resumed run must share with the checkpoint: its ``identity``, hashed."""
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]


def resolve_init(value: list[str] | str, space: str, method: str, options: Mapping[str, Any]) -> list[str]:
    """The baselines whose configurations a search adds to its initial population, from what a recipe says.

    'auto': the space's default warm start (``SpacePlugin.default_init``; a recipe without init_from
    means it); 'none' or '': none, the paper's random initialisation; else a list or a comma-separated
    string of baselines or configuration files (``is_config_file``; stored by absolute path). Resolved when the
    recipe is made, so recipe.json and result.json name the methods, and a stored recipe.json with [] (as every
    search before 'auto' wrote) still means random. A run that is not a search takes none: its fingerprint does
    not depend on a search setting.
    """
    if method != "evopress":
        return []
    if isinstance(value, str):
        if value.strip() == AUTO:
            return default_init(space, options)
        value = [] if value.strip() == NO_INIT else value.split(",")
    return [str(Path(m.strip()).resolve()) if is_config_file(m.strip()) else m.strip() for m in value if m.strip()]


def is_config_file(method: str) -> bool:
    """Whether an ``init_from`` entry names a configuration file (any layout ``import-config`` reads, e.g. a
    result's config.txt or another space's file the space reads) rather than a baseline."""
    return method.endswith(".txt") or Path(method).is_file()


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether a value read from YAML/JSON/kwargs fits a dataclass field's annotation."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_type_ok(v, a) for v, a in zip(value, args))
        return all(_type_ok(v, args[0]) for v in value) if args else True
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, hint)


def _check_types(settings: Mapping[str, Any], cls: type, section: str = "") -> None:
    hints = typing.get_type_hints(cls)
    for key, value in settings.items():
        if key in hints and not _type_ok(value, hints[key]):
            shown = str(hints[key]).replace("typing.", "")
            raise UserError(f"bad recipe: {section}{key} = {value!r} is not {shown}")


def _check_ranges(recipe: Recipe) -> None:
    if recipe.target is not None and not math.isfinite(recipe.target):  # a space's range check may let inf by
        raise UserError(f"target (--target) must be a finite number, not {recipe.target}")
    if recipe.seq_len < 2:
        raise UserError(f"seq_len (--seq-len) must be at least 2, not {recipe.seq_len}")
    if recipe.bos not in BOS_POLICIES:
        raise UserError(f"bos (--bos) must be one of {', '.join(BOS_POLICIES)}, not {recipe.bos!r}")
    if recipe.track_every < 0:
        raise UserError(f"track_every (--track-every) must be >= 0 (0: off), not {recipe.track_every}")
    positive = {"final_tokens": recipe.final_tokens, "track_tokens": recipe.track_tokens,
                "baseline_tokens": recipe.baseline_tokens, "random_candidates": recipe.random_candidates,
                "fitness.batch_size": recipe.fitness.batch_size, "fitness.chunk_tokens": recipe.fitness.chunk_tokens,
                "search.initial_candidates": recipe.search.initial_candidates,
                "search.initial_tokens": recipe.search.initial_tokens}
    if recipe.calib_tokens is not None:
        positive["calib_tokens"] = recipe.calib_tokens
    for name, value in positive.items():
        if value is not None and value < 1:
            flag = name.split(".")[-1].replace("_", "-")
            raise UserError(f"{name} (--{flag}) must be a positive number, not {value}")
    if recipe.fitness.cache_bytes < 0:
        raise UserError("--prefix-cache-gb must be >= 0")
    if recipe.fitness.batch_tokens is not None and recipe.fitness.batch_tokens < 1:
        raise UserError(f"fitness.batch_tokens (--batch-tokens) must be a positive number, not "
                        f"{recipe.fitness.batch_tokens}")


def _split(settings: dict[str, Any], cls: type) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: settings.pop(k) for k in list(settings) if k in names}


def make_recipe(mapping: Mapping[str, Any] | None = None, /, **settings: Any) -> Recipe:
    """A checked Recipe from a mapping and/or keyword arguments.

    Search and fitness settings may be nested (``search: {...}``, as in recipe files and
    recipe.json) or given flat at top level (as the Python API takes them).
    """
    settings = {**(mapping or {}), **settings}
    for section in ("search", "fitness"):
        if not isinstance(settings.get(section) or {}, dict):
            raise UserError(f"bad recipe: '{section}' must be a mapping of settings")
    search = {**(settings.pop("search", None) or {}), **_split(settings, SearchConfig)}
    fitness = {**(settings.pop("fitness", None) or {}), **_split(settings, FitnessConfig)}
    fitness = {k: v for k, v in fitness.items() if k not in _RETIRED_FITNESS_KEYS}
    unknown = sorted(set(settings) - {f.name for f in fields(Recipe)} - {"search", "fitness"})
    if unknown:
        raise UserError(f"bad recipe: unknown setting(s) {', '.join(unknown)}")
    _check_types(settings, Recipe)
    _check_types(search, SearchConfig, "search.")
    _check_types(fitness, FitnessConfig, "fitness.")
    if "stages" in search:
        search["stages"] = [tuple(s) for s in search["stages"]]
    if isinstance(settings.get("model"), str) and Path(settings["model"]).expanduser().exists():
        settings["model"] = str(Path(settings["model"]).expanduser().resolve())  # evaluate from any directory
    recipe = Recipe(**settings, search=SearchConfig(**search), fitness=FitnessConfig(**fitness))
    recipe.search.validate()
    if recipe.target is None and recipe.method != "imported":
        raise UserError("bad recipe: a target is required (only an imported configuration may take its file's)")
    _check_ranges(recipe)
    check_space_settings(recipe.space, recipe.target, recipe.space_options)
    recipe.hardware.check()
    for method in [recipe.method] * (recipe.method not in ("evopress", "imported")) + recipe.init_from:
        if not is_config_file(method):
            baseline(recipe.space, method)
    return recipe


def check_inputs(recipe: Recipe) -> None:
    """Refuse a run whose calibration text or level database is missing, before its model loads (minutes).

    Not part of ``make_recipe``: a saved recipe.json is read again (to compare a rerun's settings, to
    evaluate its result) after its text or database may have moved, which must not refuse those. A
    database option is the one every database-backed space declares (``DB_OPTION``, required) or any
    other stored by absolute path (``absolute_path``: databases only); what it holds (its space, its
    model) is checked by the space once the model is loaded.
    """
    check_source(recipe.data)
    for option in get_plugin(recipe.space).options:
        path = recipe.space_options.get(option.key)
        if path is None and option is DB_OPTION:
            raise UserError(f"space '{recipe.space}' needs {option.flags[0]}, a {option.help}")
        if path is not None and option.convert is absolute_path and not (Path(path) / MANIFEST).is_file():
            raise UserError(f"{option.flags[0]} {path}: no database there (no {MANIFEST}: not built, or its "
                            "build-db did not finish)")
