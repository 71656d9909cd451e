"""Unstructured sparsity: a non-zero count per linear layer, from a SparseGPT level database."""

from ..plugin import CliOption, SpacePlugin
from ..layerwise import DB_OPTION, group_rule_option
from . import baselines, bitmask, build, export, finalize, formats
from .space import SparsitySpace, check_target

PLUGIN = SpacePlugin(
    name="sparsity",
    space=SparsitySpace,
    target_help="sparsity: average fraction of zeros in the blocks' linear weights, e.g. 0.5",
    check_target=check_target,
    options=(DB_OPTION, group_rule_option("sparsity", "global", "global (any layer with any other) or size "
                                          "(equal-size layers)")),
    baselines={"uniform": baselines.uniform, "owl": baselines.owl},
    default_init=("owl",),
    build=build.build,
    build_options=(
        CliOption(("--center", "--target"), "center", "sparsity: the average sparsity the database's levels "
                  "centre on (--target is an alias); it serves any search target inside its level range",
                  default=build.DEFAULT_CENTER, type=float),
        CliOption(("--levels",), "levels", "sparsity: levels on each side of the centre",
                  default=build.DEFAULT_LEVELS, type=int),
        CliOption(("--step",), "step", "sparsity: weights pruned per level step, the same for every layer "
                  "(default: min(largest layer / 50, smallest layer / 4))", type=int),
        CliOption(("--method",), "method", "sparsity: sparsegpt (default), wanda, magnitude", default="sparsegpt"),
    ),
    export=export.export,
    finalize=finalize.finalize_jobs,
    export_formats={bitmask.FORMAT: bitmask.export_bitmask},
    load=bitmask.load,
    config_formats={"reference-sparsity": formats.REFERENCE},
)

__all__ = ["PLUGIN", "SparsitySpace"]
