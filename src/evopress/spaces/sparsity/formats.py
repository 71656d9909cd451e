"""The reference sparsity search's files: ``<layer name>: <level>``, the level a signed database offset.

The reference stores level ``l`` of a layer as ``<layer>/<l>.pth``, the sparsity ``s + l * Δ / numel``
around its database's sparsity ``s`` (Δ = ``weights_diff``, 1,000,000 weights in its scripts), and
its configuration names that file: the offset, not a position in a list (its levels start at a
different negative offset for every layer size). Our labels are the same offsets from our database's
centre in steps of ``--step`` weights, so a reference file reads unchanged and means the same
sparsities on a database built with ``--center s --step Δ`` (docs/sparsity.md). It writes the lines in
the order of its database's directory listing, layer names sorted as text (``model.layers.10`` before
``model.layers.2``), with no newline after the last; that is the only difference from ``config.txt``.
"""

from __future__ import annotations

from ..plugin import ConfigFormat

from ..problem import Config

from ..space import Space
from ..textconfig import joined, labelled_line, labelled_lines, read_labelled


def write(space: Space, config: Config) -> str:
    return joined(labelled_lines(space, config), sorted(range(len(space.units)), key=space.units.__getitem__))


REFERENCE = ConfigFormat(
    help="the reference sparsity search's configuration: '<layer>: <offset>' lines, sorted by name",
    fits_line=labelled_line(r"-?\d+"),
    read=read_labelled,
    write=write,
)
