"""Joint compression: drop sub-blocks, choose every remaining layer's bitwidth (and sparsity) under one byte budget."""

from ..plugin import CliOption, SpacePlugin, byte_tolerance_option
from ..problem import BYTE_TOLERANCE
from ..layerwise import DB_OPTION, absolute_path
from . import baselines, export, finalize
from .space import JointSpace, check_target

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
        byte_tolerance_option("joint", BYTE_TOLERANCE),
        CliOption(("--with-sparsity",), "with_sparsity", "joint: a sparsity database of the same model (build-db "
                  "--space sparsity); its levels, quantized at each of --db's bitwidths, join every layer's levels",
                  convert=absolute_path),
    ),
    baselines={"uniform": baselines.uniform, "depth": baselines.depth, "grid": baselines.grid},
    default_init=("grid",),  # below the byte window: the warm start repairs it into the window
    default_init_with_rules=(),  # the joint baselines take no rules
    export=export.export,
    finalize=finalize.finalize_jobs,
)

__all__ = ["PLUGIN", "JointSpace"]
