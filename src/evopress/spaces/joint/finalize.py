"""Finalize a joint profile: its dropped sub-blocks stay dropped, every kept layer is GPTQ-quantized
again at its bitwidth on the inputs of the finalized model (``spaces/finalize.py``)."""

from __future__ import annotations

from ...database import Database
from ...errors import UserError
from ..finalize import LayerJob
from ..problem import Config
from ..quant.finalize import quant_job
from .space import JointSpace


def finalize_jobs(space: JointSpace, config: Config) -> tuple[Database, dict[str, LayerJob]]:
    kept = [(u, space.levels[u][config[u]]) for u in space.kept_layers(config)]
    pruned = [space.units[u] for u, lv in kept if lv.sparse is not None]
    if pruned:
        raise UserError(f"finalize re-solves the joint space's GPTQ levels, not its pruned-and-rounded ones "
                        f"({len(pruned)} layers, e.g. {pruned[0]}); export the result as it is")
    space.drop.apply(space.split(config)[1])  # the layers are solved with the sub-blocks dropped
    return space.quant.db, {space.units[u]: quant_job(space.quant, u, lv.bits) for u, lv in kept}
