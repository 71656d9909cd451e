"""GGUF: a llama.cpp quant type per weight tensor (embeddings and head included), under a byte budget."""

from ..plugin import CliOption, SpacePlugin, byte_tolerance_option
from ..problem import BYTE_TOLERANCE
from ..layerwise import DB_OPTION
from . import baselines, build, export
from .space import GGUFSpace, check_target

PLUGIN = SpacePlugin(
    name="gguf",
    space=GGUFSpace,
    target_help="gguf: bits per weight of the quantized tensors as a GGUF stores them (e.g. 4.5); with "
                "--target-bytes, bytes",
    check_target=check_target,
    options=(
        DB_OPTION,
        CliOption(("--target-bytes",), "target_bytes", "gguf: --target is a byte count instead of bits "
                  "per weight", default=False, is_flag=True),
        byte_tolerance_option("gguf", BYTE_TOLERANCE),
        CliOption(("--types",), "types", "gguf: search only these of the database's llama.cpp types (comma-"
                  "separated, e.g. Q3_K,Q4_K,Q6_K)"),
    ),
    baselines=baselines.BASELINES,
    default_init=("preset", "uniform"),  # uniform can win: docs/gguf.md (Q5_1 holds a Q4_1 reference exactly)
    build=build.build,
    build_options=(
        CliOption(("--types",), "types", "gguf: comma-separated llama.cpp types to quantize every tensor to "
                  f"(default {','.join(build.DEFAULT_TYPES)}; K and IQ types fall back as llama.cpp does on rows "
                  "they do not divide)"),
        CliOption(("--no-imatrix",), "no_imatrix", "gguf: quantize without an importance matrix (llama.cpp's "
                  "default); by default one is computed from the calibration text and written as imatrix.gguf",
                  default=False, is_flag=True),
    ),
    export=export.export_gguf,
)

__all__ = ["PLUGIN", "GGUFSpace"]
