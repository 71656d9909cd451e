"""The reference quantization search's files: ``<layer name>: <bits>``, our labels exactly.

The reference writes its layers group by group: it sorts the names by block and then by the rest of
the name as dotted parts (``mlp.down_proj`` before ``self_attn.k_proj``), groups them by its
``--group_rule`` (``size``: equal weight count, in order of first appearance; ``name``: the last name
part) and writes each group's lines, newline-separated, with no newline after the last. With
``--merge_groups`` (fused projections sharing one bitwidth) a line names several layers,
comma-separated; such lines are read, and written back one layer per line. Writing follows the
result's own ``--group-rule``, so a file the reference wrote with the same rule comes back byte for byte.
"""

from __future__ import annotations

import re
from functools import partial

from ..plugin import ConfigFormat

from ..problem import Config
from ..textconfig import joined, labelled_line, labelled_lines, read_labelled
from .space import QuantSpace


def reference_order(space: QuantSpace) -> list[int]:
    """Unit indices in the order the reference writes them (module docstring)."""
    def rest(u: int) -> tuple[str, ...]:
        return tuple(re.sub(r"^.*?\.\d+\.", "", space.units[u]).split("."))

    def group(u: int) -> object:
        rows, columns = space.shapes[u]
        return space.units[u].rsplit(".", 1)[-1] if space.group_rule == "name" else rows * columns

    ordered = sorted(range(len(space.units)), key=lambda u: (space.unit_block[u], rest(u)))
    groups: dict[object, list[int]] = {}
    for u in ordered:
        groups.setdefault(group(u), []).append(u)
    return [u for members in groups.values() for u in members]


def write(space: QuantSpace, config: Config) -> str:
    return joined(labelled_lines(space, config), reference_order(space))


REFERENCE = ConfigFormat(
    help="the reference quantization search's configuration: '<layer>: <bits>' lines, group by group",
    fits_line=labelled_line(r"\d+", several=True),
    read=partial(read_labelled, several=True),
    write=write,
)
