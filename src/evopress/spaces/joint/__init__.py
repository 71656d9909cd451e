"""Joint compression: drop sub-blocks and choose every remaining layer's bitwidth under one byte budget."""

from ..base import CliOption, SpacePlugin
from ..layerwise import DB_OPTION
from . import baselines, export
from .space import TOLERANCE, JointSpace, check_target

PLUGIN = SpacePlugin(
    name="joint",
    space=JointSpace,
    target_help="joint: average bits per weight of the blocks' linear layers counting scales and zero points "
                "(--target-bits), e.g. 3; with --target-bytes, bytes",
    check_target=check_target,
    options=(
        DB_OPTION,
        CliOption(("--target-bytes",), "target_bytes", "joint: --target is a byte count of the compressed "
                  "decoder-block weights (e.g. 4.5e7) instead of average bits per weight", default=False,
                  is_flag=True),
        CliOption(("--byte-tolerance",), "tolerance", "joint: achieved bytes stay within this fraction below the "
                  "target, never above (default 0.001)", default=TOLERANCE, type=float),
    ),
    baselines={"uniform": baselines.uniform, "depth": baselines.depth, "grid": baselines.grid},
    default_init=("grid",),  # below the byte window: the warm start repairs it into the window
    default_init_with_rules=(),  # the joint baselines take no rules
    export=export.export,
)

__all__ = ["PLUGIN", "JointSpace"]
