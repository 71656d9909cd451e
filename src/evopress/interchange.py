"""Text configurations: which layout a file has, reading it into a space (with its target), writing it.

Every space reads and writes our own layout, ``module.name: level`` lines (``OWN``; what
``config.txt`` holds, see ``spaces/textconfig.py``). A space adds other tools' layouts as
``SpacePlugin.config_formats`` (the reference implementation's live in ``spaces/<name>/formats.py``).
This module only picks among what the registered spaces offer, finds a file's target and checks budgets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import UserError
from .io import atomic_write
from .models import Decoder
from .spaces import PLUGINS, get_plugin
from .spaces.plugin import ConfigFormat
from .spaces.problem import Config
from .spaces.space import Space
from .spaces.textconfig import LABELLED, content_lines

OWN = "evopress"


def formats(space: str) -> dict[str, ConfigFormat]:
    """The layouts ``space`` reads and writes: ours first, then the space's own."""
    return {OWN: LABELLED, **get_plugin(space).config_formats}


def all_formats() -> dict[str, ConfigFormat]:
    """Every layout some registered space offers, by name (what ``--format`` accepts)."""
    return {name: form for space in PLUGINS for name, form in formats(space).items()}


def get_format(space: str, name: str) -> ConfigFormat:
    offered = formats(space)
    if name not in offered:
        owners = [other for other in PLUGINS if name in formats(other)]
        hint = f"; it is a format of space '{owners[0]}' (--space {owners[0]})" if owners else ""
        raise UserError(f"space '{space}' has no config format '{name}' (it has {', '.join(offered)}){hint}")
    return offered[name]


def choose_format(space: str, text: str, name: str | None, source: str) -> tuple[str, ConfigFormat]:
    """Format ``name``, or without one the first of ``space``'s formats that every line of ``text`` fits.

    Ours comes first: the reference's sparsity and quantization files are our lines in another order,
    so they read the same either way; only the depth files need their own reader. A file that fits
    another space's format is refused with that space's name; one with bad lines is read with the
    format most of its lines fit, whose reader then names the first bad line.
    """
    if name is not None:
        return name, get_format(space, name)
    lines = [line for _, line in content_lines(text)]
    offered = formats(space)

    def fitting(form: ConfigFormat) -> int:
        return sum(map(form.fits_line, lines))

    for found, form in offered.items():
        if lines and fitting(form) == len(lines):
            return found, form
    for other in PLUGINS:
        for found, form in get_plugin(other).config_formats.items():
            if lines and fitting(form) == len(lines):
                raise UserError(f"{source} looks like {found}, a format of space '{other}', not of '{space}' "
                                f"(--space {other})")
    found = max(offered, key=lambda n: fitting(offered[n]))
    return found, offered[found]


def read_text(path: Path) -> str:
    if not Path(path).is_file():
        raise UserError(f"config {path} not found")
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"config {path} is not UTF-8 text (byte {e.start})") from e


def implied_target(text: str, form: ConfigFormat, space: str, decoder: Decoder, options: dict[str, Any],
                   source: str) -> float:
    """The target the file's configuration meets exactly, from the space built without one.

    Rules are left out: they restrict a search, not what a file may say (``parse_config`` checks them).
    """
    plugin = get_plugin(space)
    if getattr(plugin.space, "implied_target", Space.implied_target) is Space.implied_target:
        raise UserError(f"space '{space}' cannot tell a configuration's target: give --target")
    reader = plugin.space(decoder, None, **{k: v for k, v in options.items() if k != "rules"})
    levels = form.read(text, reader, source)
    try:
        return reader.implied_target(levels)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None


def parse_config(text: str, space: Space, source: str = "config", form: ConfigFormat = LABELLED) -> Config:
    """A configuration of ``space`` from text naming the model's modules (rules, if any, are checked)."""
    config = space.from_model_levels(form.read(text, space.model_space, source))
    if not space.problem.feasible(config):
        raise UserError(f"{source}: the configuration does not meet the budget of target "
                        f"{getattr(space, 'target', '?')} (cost {space.problem.cost(config)} != {space.problem.budget})")
    return config


def format_config(space: Space, config: Config, form: ConfigFormat = LABELLED) -> str:
    return form.write(space.model_space, space.to_model_levels(config))


def write_config(path: Path, space: Space, config: Config) -> None:
    text = format_config(space, config)
    atomic_write(path, lambda tmp: tmp.write_text(text))
