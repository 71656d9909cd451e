"""llama.cpp's tensor types as levels: sizes, the shape fallback, and the quantizer behind them.

Why libgguf (``libgguf==0.2.2``, the ``gguf`` extra): it quantizes rows to every llama.cpp type, K and IQ
included, with an importance matrix, from a prebuilt numpy wheel, and its bytes are ggml's bit for bit
(checked against the ggml bundled in xllamacpp, docs/gguf.md). ``gguf`` (gguf-py) dequantizes every
type but quantizes only the legacy ones and takes no imatrix; llama-cpp-python and ggml-python have no
wheel here. The fitness dequantizes with libgguf; a test holds it to gguf-py's dequantizer.

A type is valid for a tensor only if its rows (``ne0``, a Linear's ``in_features``) are a multiple of
the type's block. Otherwise llama.cpp's ``tensor_type_fallback`` applies (``src/llama-quant.cpp``,
followed at commit 007dbbf3): Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, the IQ
types -> IQ4_NL, and F16 where even 32 does not divide the rows. A model with 576-wide rows therefore
offers only the legacy types for its 576-input tensors, whatever the requested list.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from ...errors import UserError

INSTALL = "pip install 'libgguf==0.2.2' (the evopress[gguf] extra)"
DEFAULT_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
# what the quantizer offers as a level (TQ*/MXFP4/NVFP4/Q1_0 are not llama.cpp's LLM quant types)
QUANT_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ1_S", "IQ1_M",
               "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS", "F16", "BF16")
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
             "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL",
             "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ4_XS": "IQ4_NL"}
# (weights per block, bytes per block): ggml's type traits
SIZES = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22),
         "Q5_1": (32, 24), "Q8_0": (32, 34), "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144),
         "Q5_K": (256, 176), "Q6_K": (256, 210), "IQ1_S": (256, 50), "IQ1_M": (256, 56), "IQ2_XXS": (256, 66),
         "IQ2_XS": (256, 74), "IQ2_S": (256, 82), "IQ3_XXS": (256, 98), "IQ3_S": (256, 110), "IQ4_NL": (32, 18),
         "IQ4_XS": (256, 136)}
NEEDS_IMATRIX = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS")  # llama-quantize refuses them without one


def parse_types(text: str | Sequence[str]) -> tuple[str, ...]:
    """``Q2_K,q4_k,...`` -> canonical names, in the order given, or one line naming what is wrong."""
    names = [t.strip().upper() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    unknown = [n for n in names if n not in QUANT_TYPES]
    if unknown or not names:
        raise UserError(f"--types {','.join(unknown) or repr(text)}: not a llama.cpp quant type this space can place "
                        f"(choose from {','.join(QUANT_TYPES)})")
    if len(set(names)) != len(names):
        raise UserError(f"--types {text}: a type is repeated")
    return tuple(names)


def fallback(qtype: str, ne0: int) -> str:
    """The type llama.cpp stores for ``qtype`` in a tensor with ``ne0``-wide rows."""
    if ne0 % SIZES[qtype][0] == 0:
        return qtype
    qtype = _FALLBACK.get(qtype, "F16")
    return qtype if ne0 % SIZES[qtype][0] == 0 else "F16"


def tensor_bytes(qtype: str, shape: Sequence[int]) -> int:
    """Bytes of a ``[rows, ne0]`` tensor stored as ``qtype`` (``qtype`` valid for ``ne0``)."""
    rows, ne0 = shape
    block, size = SIZES[qtype]
    if ne0 % block:
        raise ValueError(f"{qtype} needs rows that are a multiple of {block}, not {ne0}")
    return rows * ne0 // block * size


def bits_per_weight(qtype: str) -> float:
    block, size = SIZES[qtype]
    return 8 * size / block


def load_libgguf() -> Any:
    """The libgguf module, or one line saying how to install it."""
    os.environ.setdefault("LIBGGUF_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)))))
    try:
        import libgguf
    except ImportError:
        raise UserError(f"the gguf space needs libgguf: {INSTALL}") from None
    return libgguf


def quantize(weight: np.ndarray, qtype: str, imatrix: np.ndarray | None) -> np.ndarray:
    """``weight`` [rows, ne0] as llama.cpp's raw ``qtype`` blocks, uint8 [rows, row bytes]."""
    lib = load_libgguf()
    if qtype in NEEDS_IMATRIX and imatrix is None:
        raise UserError(f"{qtype} needs an importance matrix (llama-quantize refuses it without one); build the "
                        "database without --no-imatrix")
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    im = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    raw = lib.quantize_rows(weight, lib.GGMLQuantizationType[qtype], imatrix=im)
    return raw.view(np.uint8)  # F16/BF16 come back as 16-bit values


def dequantize(raw: np.ndarray, qtype: str, ne0: int) -> np.ndarray:
    """float32 [rows, ne0] of raw ``qtype`` blocks, exactly as llama.cpp dequantizes them."""
    raw = np.ascontiguousarray(raw)
    if qtype == "F16":  # stored values, which libgguf's row API does not take
        return raw.view(np.float16).astype(np.float32)
    if qtype == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    lib = load_libgguf()
    return lib.dequantize_rows(raw, lib.GGMLQuantizationType[qtype], n_per_row=ne0)
