"""Structured width: kept KV groups per attention and kept channels per MLP, from an OBS level database."""

from ..plugin import CliOption, SpacePlugin
from ..layerwise import DB_OPTION
from . import baselines, build, export, formats
from .space import WidthSpace, check_target

PLUGIN = SpacePlugin(
    name="width",
    space=WidthSpace,
    target_help="width: fraction of the blocks' linear parameters removed by thinning heads and channels, e.g. 0.25",
    check_target=check_target,
    options=(DB_OPTION,),
    baselines={"uniform": baselines.uniform, "shortgpt": baselines.shortgpt},
    default_init=("uniform", "shortgpt"),
    build=build.build,
    build_options=(
        CliOption(("--method",), "method", "width: obs (second-order removal with weight update, default) or "
                  "activation (rank by activation norm, no update: the Minitron-style baseline)", default="obs"),
        CliOption(("--mlp-step",), "mlp_step", "width: MLP channels per level, a multiple of 32 (default: the "
                  "multiple of 64 giving about 24 levels)", type=int),
    ),
    export=export.export,
    load=export.load,
    config_formats={"reference-drop": formats.DEPTH},
)

__all__ = ["PLUGIN", "WidthSpace"]
