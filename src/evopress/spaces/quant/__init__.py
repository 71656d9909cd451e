"""Quantization: a bitwidth per linear layer, from a GPTQ level database."""

from ..plugin import CliOption, SpacePlugin
from ..layerwise import DB_OPTION, group_rule_option
from . import baselines, build, export, finalize, formats
from .space import QuantSpace, check_target

PLUGIN = SpacePlugin(
    name="quant",
    space=QuantSpace,
    target_help="quant: average bits per weight, e.g. 3 or 2.5",
    check_target=check_target,
    options=(
        DB_OPTION,
        group_rule_option("quant", "size", "size (equal-size layers) or name (same projection)"),
        CliOption(("--count-overhead",), "overhead", "quant: the budget counts each group's fp16 scale and zero "
                  "point too (true bytes); default: weight bits only, as the paper", default=False, is_flag=True),
    ),
    baselines={"uniform": baselines.uniform, "dp": baselines.dp},
    default_init=("dp",),
    build=build.build,
    build_options=(
        CliOption(("--bits",), "bits", "quant: comma-separated bitwidths, e.g. 2,3,4,5,6,8"),
        CliOption(("--group-size",), "group_size", "quant: columns per scale/zero group (default: 128, or the "
                  "largest power of two dividing every layer's inputs)", type=int),
        CliOption(("--calib-bits",), "calib_bits", "quant: bitwidth installed between blocks while building "
                  f"(default {build.DEFAULT_CALIB_BITS}; 0: dense inputs)", type=int),
        CliOption(("--no-act-order",), "no_act_order", "quant: GPTQ in column order (the paper's FastOBQ) instead "
                  "of act-order with static groups", default=False, is_flag=True),
        CliOption(("--symmetric",), "symmetric", "quant: GPTQ's symmetric grid (zero point 2^(b-1)): exports that "
                  "plain transformers from_pretrained loads, at some quality cost (docs/quant.md)",
                  default=False, is_flag=True),
    ),
    export=export.export_quantized,
    finalize=finalize.finalize_jobs,
    load=export.load,
    config_formats={"reference-quant": formats.REFERENCE},
)

__all__ = ["PLUGIN", "QuantSpace"]
