"""Depth: drop attention and/or MLP sub-blocks, or whole blocks."""

from ..plugin import CliOption, SpacePlugin
from . import baselines, export, formats
from .space import DropSpace, check_target, drop_count

PLUGIN = SpacePlugin(
    name="drop",
    space=DropSpace,
    target_help="drop: fraction of sub-blocks of each kind to remove, e.g. 0.25",
    check_target=check_target,
    options=(CliOption(("--granularity",), "granularity", "drop: sublayer (attention and MLP separately, as in "
                       "the paper) or block (whole blocks)", default="sublayer"),),
    baselines={"shortgpt": baselines.shortgpt, "angular": baselines.angular},
    default_init=("shortgpt", "angular"),  # docs/speed.md: the time-to-quality measurement
    default_init_with_rules=(),  # they rank whole blocks and take no rules
    export=export.export,
    load=export.load,
    config_formats={"reference-drop": formats.REFERENCE},
)

__all__ = ["PLUGIN", "DropSpace", "drop_count"]
