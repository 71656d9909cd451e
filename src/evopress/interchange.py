"""Plain-text configurations, one ``module.name: value`` per line, as the reference implementation writes.

The value is what the level means to a user, not our internal index: 1/0 (dropped/kept) for depth
units, bits for quantization, the level offset from the database centre for sparsity. Spaces say how
their levels are labelled (``Space.level_labels``); this module only reads and writes the text.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UserError
from .io import atomic_write
from .spaces.base import Config, Space


def format_config(space: Space, config: Config) -> str:
    model, levels = space.model_space, space.to_model_levels(config)
    return "".join(f"{unit}: {model.level_labels(u)[level]}\n" for u, (unit, level)
                   in enumerate(zip(model.units, levels)))


def write_config(path: Path, space: Space, config: Config) -> None:
    text = format_config(space, config)
    atomic_write(path, lambda tmp: tmp.write_text(text))


def parse_config(text: str, space: Space, source: str = "config") -> Config:
    """A configuration of ``space`` from text naming the model's modules (rules, if any, are checked)."""
    config = space.from_model_levels(_parse_levels(text, space.model_space, source))
    if not space.problem.feasible(config):
        raise UserError(f"{source}: the configuration does not meet the budget of target "
                        f"{getattr(space, 'target', '?')} (cost {space.problem.cost(config)} != {space.problem.budget})")
    return config


def _parse_levels(text: str, space: Space, source: str) -> Config:
    index = {unit: u for u, unit in enumerate(space.units)}
    levels: dict[int, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, value = line.rpartition(":")
        name, value = name.strip(), value.strip()
        if not sep or name not in index:
            raise UserError(f"{source}:{n}: expected '<module>: <level>' with a module of this model's "
                            f"'{space.name}' space, got '{line}'")
        labels = [str(x) for x in space.level_labels(index[name])]
        if value not in labels:
            raise UserError(f"{source}:{n}: level '{value}' of {name} is not one of {', '.join(labels)}")
        levels[index[name]] = labels.index(value)
    missing = [space.units[u] for u in range(len(space.units)) if u not in levels]
    if missing:
        raise UserError(f"{source}: no level for {len(missing)} units, e.g. {missing[0]}")
    return tuple(levels[u] for u in range(len(space.units)))
