"""``module.name: label`` lines: the text layout every space reads and writes, and its building blocks.

A label is what a level means to a user (``Space.level_labels``), not our internal index: 1/0
(dropped/kept) for depth units, bits for quantization, the offset from the database centre for
sparsity. Our own files (``config.txt``) are these lines in the model's module order, each ending in
a newline (``LABELLED``). The reference implementation's sparsity and quantization files are the
same lines in another order; those spaces build their formats from the pieces here. The pieces live
under ``spaces/`` so that space packages can use them without importing ``interchange``.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

from ..errors import UserError
from .plugin import ConfigFormat
from .problem import Config
from .space import Space

NAME = r"[^\s,:#]+"  # a module name: no blanks, commas, colons or comment marks


def content_lines(text: str) -> list[tuple[int, str]]:
    """(line number, stripped text) of the lines that say something; ``#`` starts a comment."""
    lines = ((n, line.split("#", 1)[0].strip()) for n, line in enumerate(text.splitlines(), 1))
    return [(n, line) for n, line in lines if line]


def labelled_line(value: str = r"\S+", several: bool = False) -> Callable[[str], bool]:
    """A test of whether a line is ``name: value`` (``several``: comma-separated names sharing one value)."""
    names = rf"{NAME}(,{NAME})*" if several else NAME
    pattern = re.compile(rf"{names}\s*:\s*{value}")
    return lambda line: pattern.fullmatch(line) is not None


def read_labelled(text: str, space: Space, source: str, several: bool = False) -> Config:
    """Levels of ``space``'s units from ``name: label`` lines, in any order, every unit exactly once.

    ``several``: a line may name several modules, comma-separated, that share its label (the
    reference quantization search writes fused projections that way).
    """
    index = {unit: u for u, unit in enumerate(space.units)}
    levels: dict[int, int] = {}
    first_line: dict[int, int] = {}
    for n, line in content_lines(text):
        names, sep, value = line.rpartition(":")
        value = value.strip()
        for name in (names.split(",") if several else [names]):
            name = name.strip()
            if not sep or name not in index:
                raise UserError(f"{source}:{n}: expected '<module>: <level>' with a module of this model's "
                                f"'{space.name}' space, got '{line}'")
            u = index[name]
            if u in first_line:
                raise UserError(f"{source}:{n}: {name} already has a level (line {first_line[u]})")
            labels = [str(x) for x in space.level_labels(u)]
            if value not in labels:
                raise UserError(f"{source}:{n}: level '{value}' of {name} is not one of {', '.join(labels)}")
            levels[u], first_line[u] = labels.index(value), n
    missing = [space.units[u] for u in range(len(space.units)) if u not in levels]
    if missing:
        raise UserError(f"{source}: no level for {len(missing)} units, e.g. {missing[0]}")
    return tuple(levels[u] for u in range(len(space.units)))


def labelled_lines(space: Space, config: Config) -> list[str]:
    """``name: label`` of every unit, in the space's unit order (no line ends)."""
    return [f"{unit}: {space.level_labels(u)[level]}" for u, (unit, level) in enumerate(zip(space.units, config))]


def write_labelled(space: Space, config: Config) -> str:
    return "".join(f"{line}\n" for line in labelled_lines(space, config))


def joined(lines: Sequence[str], order: Sequence[int]) -> str:
    """``lines`` in ``order``, newline-separated with none after the last: how the reference writes files."""
    return "\n".join(lines[i] for i in order)


LABELLED = ConfigFormat(
    help="'module.name: level' per line, the level as config.txt writes it (1/0 dropped, bits, offset)",
    fits_line=labelled_line(),
    read=read_labelled,
    write=write_labelled,
)
