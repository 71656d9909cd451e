"""Which llama.cpp type each weight tensor gets under llama-quantize's K presets (Q2_K ... Q6_K).

Why: a per-tensor search over GGUF types is only worth something if it beats what a user gets from
``llama-quantize model.gguf out.gguf Q4_K_M``; to compare at equal size we need that file's exact
per-tensor mix without running llama.cpp. This module restates, in our own code, the rules of
``src/llama-quant.cpp`` (``llama_ftype_get_default_type``, ``llama_tensor_get_type_impl``,
``tensor_type_fallback``) at the commit in ``LLAMA_CPP_COMMIT``, for the case llama-quantize runs with
no ``--tensor-type``/``--output-tensor-type``/``--token-embedding-type`` override, no ``--pure`` and
no imatrix (the K presets listed here choose the same types with or without one).

Scope: dense (non-MoE) Llama-like models (``llama``, ``qwen2``, ``qwen3``, mistral in ``llama`` form,
...): token_embd, output, and per layer attn_q/attn_k/attn_v/attn_output/ffn_gate/ffn_up/ffn_down.
Not modelled, so refused with ValueError: Falcon (its fused attn_qkv and Falcon-only branches), MoE
models (``n_expert`` rules; their expert/fused tensor names are refused), and 80-layer models of archs
other than llama/qwen2 (llama.cpp's "70B" bump of attn_v depends on each arch's size table; only those
two are restated here).

Version caveat: llama.cpp before PR #9935 (2024-11) counted attn_v/ffn_down in the input file's
order (lexicographic: blk.0, blk.1, blk.10, ...), so older Q4_K_M/Q5_K_M files put Q6_K on other
layers. benchmarks/gguf_preset_check.py --visit-order file reproduces those files exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from .types import SIZES, fallback

PRESETS: tuple[str, ...] = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")
LLAMA_CPP_COMMIT = "007dbbf3fd17eefe9b47fee45f48f7ba5e62b714"

# llama_ftype_get_default_type: the type every tensor gets unless a rule below says otherwise
DEFAULT_TYPE = {"Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K", "Q4_K_S": "Q4_K",
                "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K"}
KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(" + "|".join(KINDS) + r")\.weight")


@dataclass(frozen=True)
class ModelShape:
    arch: str            # GGUF general.architecture, e.g. "llama", "qwen2"
    n_layer: int
    n_head: int
    n_head_kv: int


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's "sensitive layer" test: the first and last eighth, and every third layer between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _parse(name: str) -> tuple[int, str]:
    """(layer, kind) of a weight name; layer -1 for token_embd/output, which llama.cpp visits first."""
    if name in ("token_embd.weight", "output.weight"):
        return -1, name.split(".")[0]
    m = _LAYER_NAME.fullmatch(name)
    if m is None:
        raise ValueError(f"{name}: not a weight tensor this module places (token_embd, output, "
                         f"blk.N.{{{','.join(KINDS)}}}.weight)")
    return int(m.group(1)), m.group(2)


def _is_70b(shape: ModelShape) -> bool:
    """llama.cpp's LLM_TYPE_70B, which moves attn_v from Q3_K/Q4_K to Q5_K (llama: 80 layers with GQA)."""
    if shape.n_layer != 80:
        return False
    if shape.arch == "llama":
        return shape.n_head != shape.n_head_kv
    if shape.arch == "qwen2":
        return True
    raise ValueError(f"arch {shape.arch!r} with 80 layers: llama.cpp may treat it as 70B (attn_v bump); "
                     "only llama and qwen2 are modelled")


def _output_type(default: str, ne0: int) -> str:
    """output.weight (and a tied token_embd): Q6_K for every K preset, Q8_0 if the default can't fit ne0."""
    return "Q8_0" if ne0 % SIZES[default][0] else "Q6_K"


def _attn_v_type(preset: str, i: int, n: int, shape: ModelShape, default: str) -> str:
    """attn_v is small under GQA and sensitive, so most presets spend more bits on it."""
    n_gqa = shape.n_head // shape.n_head_kv
    if preset == "Q2_K":
        qtype = "Q4_K" if n_gqa >= 4 else "Q3_K"
    elif preset == "Q3_K_M":
        qtype = "Q5_K" if i < 2 else "Q4_K"
    elif preset == "Q3_K_L":
        qtype = "Q5_K"
    elif preset in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
        qtype = "Q6_K"
    elif preset == "Q4_K_S" and i < 4:
        qtype = "Q5_K"
    else:
        qtype = default
    if _is_70b(shape) and qtype in ("Q3_K", "Q4_K"):
        qtype = "Q5_K"
    return qtype


def _ffn_down_type(preset: str, i: int, n: int, default: str) -> str:
    """ffn_down by position i of n layers: early and sensitive layers get more bits."""
    if preset == "Q2_K":
        return "Q3_K"
    if preset == "Q3_K_M":
        return "Q5_K" if i < n // 16 else "Q4_K"
    if preset == "Q3_K_L":
        return "Q5_K"
    if preset in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
        return "Q6_K"
    if preset == "Q4_K_S" and i < n // 8:
        return "Q5_K"
    return default


_ATTN_OUTPUT = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}  # dense, non-Falcon


def _check(preset: str, shape: ModelShape) -> None:
    if preset not in DEFAULT_TYPE:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    if shape.arch == "falcon":
        raise ValueError("falcon is not modelled (fused attn_qkv and Falcon-only preset rules)")
    if shape.n_head_kv <= 0 or shape.n_head <= 0 or shape.n_layer <= 0:
        raise ValueError(f"bad model shape {shape}")


def preset_types(preset: str, tensors: Sequence[tuple[str, int]], shape: ModelShape) -> dict[str, str]:
    """GGUF tensor name -> type name (after the shape fallback) for every tensor given.
    tensors: (GGUF tensor name, ne0 = row length = HF in_features), any order."""
    _check(preset, shape)
    default = DEFAULT_TYPE[preset]
    # llama.cpp visits weights sorted by (layer, name); attn_v and ffn_down rules use running counters
    ordered = sorted(((*_parse(name), name, ne0) for name, ne0 in tensors))
    tied = all(kind != "output" for _, kind, _, _ in ordered)
    n_attn_v = sum(kind == "attn_v" for _, kind, _, _ in ordered)
    i_attn_v = i_ffn_down = 0
    out: dict[str, str] = {}
    for _, kind, name, ne0 in ordered:
        if kind == "output" or (kind == "token_embd" and tied):
            qtype = _output_type(default, ne0)
        elif kind == "attn_v":
            qtype = _attn_v_type(preset, i_attn_v, n_attn_v, shape, default)
            i_attn_v += 1
        elif kind == "ffn_down":
            qtype = _ffn_down_type(preset, i_ffn_down, shape.n_layer, default)
            i_ffn_down += 1
        elif kind == "attn_output":
            qtype = _ATTN_OUTPUT.get(preset, default)
        else:  # untied token_embd, attn_q, attn_k, ffn_gate, ffn_up: the default for every K preset
            qtype = default
        out[name] = fallback(qtype, ne0)
    return out
