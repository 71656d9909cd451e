"""Depth profiles as width profiles: the reference depth search's ``layer_drop_config.txt`` in the width space.

Every depth profile is a width profile (a dropped sub-block is a unit at width 0, every other unit at its full
width), so the width space reads the depth files (what ``export-config --format reference-drop`` writes for a
depth result) through the depth space's own parser. Why: ``--init-from FILE`` can then start a width search
from a depth search's answer, and ``import-config`` scores a depth profile with the width database's costs.
"""

from __future__ import annotations

from types import SimpleNamespace

from ...errors import UserError
from ..drop import formats as depth
from ..plugin import ConfigFormat
from ..problem import Config
from .space import WidthSpace


def read(text: str, space: WidthSpace, source: str) -> Config:
    view = SimpleNamespace(num_blocks=space.num_blocks, granularity="sublayer", config_from_masks=lambda m: m)
    masks = depth.read(text, view, source)  # type: ignore[arg-type]
    config = []
    for unit in space.wunits:
        dropped = masks[unit.block][unit.kind == "mlp"]
        if dropped and unit.widths[0] != 0:
            raise UserError(f"{source}: block {unit.block} drops its {unit.kind}, whose output projection has a "
                            "bias: the width space cannot remove it")
        config.append(0 if dropped else len(unit.widths) - 1)
    return tuple(config)


def write(space: WidthSpace, config: Config) -> str:
    masks = [[False, False] for _ in range(space.num_blocks)]
    for unit, width in zip(space.wunits, space.widths(config)):
        if 0 < width < unit.structures:
            raise UserError(f"the profile keeps {width} of {unit.structures} structures of {unit.name}: only "
                            "profiles of removed and full-width sub-blocks are depth profiles")
        masks[unit.block][unit.kind == "mlp"] = width == 0
    return "".join(f"{depth.WORDS[tuple(m)]}\n" for m in masks)


DEPTH = ConfigFormat(
    help=depth.REFERENCE.help + " (the width space reads it as removed and full-width sub-blocks)",
    fits_line=depth.REFERENCE.fits_line,
    read=read,
    write=write,
)
