"""Gguf baselines: llama.cpp's own mixes, the anchors EvoPress must beat at their own sizes.

* ``Q2_K`` ... ``Q6_K``: a llama-quantize preset reproduced tensor by tensor (``presets.py``); on a database
  built with an imatrix it is the preset quantized with that imatrix, on a ``--no-imatrix`` one without.
  A preset has its own size: the target must be at or above it (``evopress build-db`` lists the sizes).
* ``preset``: the largest preset within the budget (the search's warm start).
* ``uniform``: every tensor at the largest requested type within the budget (after the shape fallback).
"""

from __future__ import annotations

from typing import Callable

from ...errors import UserError
from ..plugin import BaselineInputs
from ..problem import Config
from ..space import Space
from .presets import PRESETS, preset_types
from .space import GGUFSpace
from .tensors import model_shape
from .types import fallback


def _gguf(space: Space) -> GGUFSpace:
    gguf = space.model_space
    assert isinstance(gguf, GGUFSpace)
    return gguf


def preset_config(space: GGUFSpace, preset: str) -> Config:
    tensors = [(name, shape[1]) for name, shape in zip(space.gguf_names, space.shapes)]
    shape = model_shape(space.decoder, space.db.manifest["arch"])
    return space.config_of(preset_types(preset, tensors, shape), f"preset {preset}")


def _fits(space: GGUFSpace, config: Config) -> bool:
    return space.problem.cost(config) <= space.problem.budget


def _too_big(space: GGUFSpace, what: str, config: Config) -> UserError:
    size = space.problem.cost(config)
    return UserError(f"{what} takes {size:,} bytes ({8 * size / space.numel:.6f} bits per weight), above the "
                     f"budget of {space.problem.budget:,} bytes: give --target {8 * size / space.numel:.6f} "
                     "or more (bits per weight, rounded up)")


def named_preset(preset: str) -> Callable[[BaselineInputs], Config]:
    def baseline(inputs: BaselineInputs) -> Config:
        space = _gguf(inputs.space)
        config = preset_config(space, preset)
        if not _fits(space, config):
            raise _too_big(space, f"preset {preset}", config)
        return inputs.space.from_model_levels(config)
    baseline.__doc__ = f"llama.cpp's {preset} mix"
    return baseline


def available_presets(space: GGUFSpace) -> dict[str, Config]:
    """The presets whose types the database offers, by name."""
    out = {}
    for preset in PRESETS:
        try:
            out[preset] = preset_config(space, preset)
        except UserError:  # a preset needing a type the database lacks
            continue
    return out


def largest_preset(inputs: BaselineInputs) -> Config:
    space = _gguf(inputs.space)
    fitting = [(space.problem.cost(c), c) for c in available_presets(space).values() if _fits(space, c)]
    if not fitting:
        raise UserError(f"no llama.cpp preset the database can make fits {space.problem.budget:,} bytes")
    return inputs.space.from_model_levels(max(fitting)[1])


def uniform(inputs: BaselineInputs) -> Config:
    space = _gguf(inputs.space)
    best = None
    for qtype in space.restricted or space.db.manifest["types"]:
        types = {n: fallback(qtype, s[1]) for n, s in zip(space.gguf_names, space.shapes)}
        config = space.config_of(types, f"uniform {qtype}")
        if _fits(space, config) and (best is None or space.problem.cost(config) > space.problem.cost(best)):
            best = config
    if best is None:
        raise UserError(f"no uniform type of the database fits {space.problem.budget:,} bytes")
    return inputs.space.from_model_levels(best)


BASELINES = {"uniform": uniform, "preset": largest_preset, **{p: named_preset(p) for p in PRESETS}}
