"""Width baselines at the search's parameter budget.

* ``uniform``: every attention and MLP at the target's kept fraction, as near as its levels allow
  (``WidthSpace.uniform_config``). On a database built with ``--method activation`` this is the
  training-free importance baseline (Minitron-style: heads and channels ranked by activation norm, the
  same width everywhere, no weight update); on the default OBS database it is uniform width with OBS.
* Depth pruning at equal parameters is the depth space's own search (``--space drop``), compared in
  ``benchmarks/width.sh``: "drop sub-blocks or thin them?"
"""

from __future__ import annotations

from ..constraints import in_space
from ..plugin import BaselineInputs
from ..problem import Config
from .space import WidthSpace


def uniform(inputs: BaselineInputs) -> Config:
    space = inputs.space.model_space
    assert isinstance(space, WidthSpace)
    return in_space(inputs.space, space.uniform_config(), inputs.seed)
