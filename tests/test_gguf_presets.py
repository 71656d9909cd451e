"""llama-quantize's K presets restated per tensor (evopress.spaces.gguf.presets), checked against
llama.cpp's src/llama-quant.cpp rules and the SmolLM2 table in the research notes."""

from __future__ import annotations

from collections import Counter

import pytest

from evopress.spaces.gguf.presets import LLAMA_CPP_COMMIT, PRESETS, ModelShape, preset_types, use_more_bits
from evopress.spaces.gguf.types import tensor_bytes

KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def llama_like(n_layer: int, hidden: int, ffn: int, n_head: int, n_head_kv: int, vocab: int,
               tied: bool) -> dict[str, tuple[int, int]]:
    """GGUF weight name -> (rows, ne0) of a dense Llama-like model."""
    kv = hidden // n_head * n_head_kv
    per_layer = {"attn_q": (hidden, hidden), "attn_k": (kv, hidden), "attn_v": (kv, hidden),
                 "attn_output": (hidden, hidden), "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden),
                 "ffn_down": (hidden, ffn)}
    shapes = {"token_embd.weight": (vocab, hidden)}
    if not tied:
        shapes["output.weight"] = (vocab, hidden)
    for i in range(n_layer):
        shapes.update({f"blk.{i}.{k}.weight": s for k, s in per_layer.items()})
    return shapes


def plan(preset: str, shapes: dict[str, tuple[int, int]], shape: ModelShape) -> dict[str, str]:
    return preset_types(preset, [(n, s[1]) for n, s in shapes.items()], shape)


def by_layer(types: dict[str, str], kind: str, n_layer: int) -> list[str]:
    return [types[f"blk.{i}.{kind}.weight"] for i in range(n_layer)]


LLAMA8B = ModelShape("llama", 32, 32, 8)
LLAMA8B_T = llama_like(32, 4096, 14336, 32, 8, 128256, tied=False)
SMOL = ModelShape("llama", 30, 9, 3)
SMOL_T = llama_like(30, 576, 1536, 9, 3, 49152, tied=True)
MORE_BITS_32 = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}
MORE_BITS_30 = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}


def test_commit_pinned():
    assert len(LLAMA_CPP_COMMIT) == 40


@pytest.mark.parametrize("n, expected", [(32, MORE_BITS_32), (30, MORE_BITS_30)])
def test_use_more_bits(n, expected):
    assert {i for i in range(n) if use_more_bits(i, n)} == expected


def test_q4_k_m_llama_4096():
    t = plan("Q4_K_M", LLAMA8B_T, LLAMA8B)
    for kind in ("attn_v", "ffn_down"):
        assert by_layer(t, kind, 32) == ["Q6_K" if i in MORE_BITS_32 else "Q4_K" for i in range(32)]
    for kind in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
        assert set(by_layer(t, kind, 32)) == {"Q4_K"}
    assert t["output.weight"] == "Q6_K"
    assert t["token_embd.weight"] == "Q4_K"  # untied: no K-preset rule, the default type


def test_order_of_input_does_not_matter():
    names = list(LLAMA8B_T.items())
    fwd = preset_types("Q4_K_M", [(n, s[1]) for n, s in names], LLAMA8B)
    rev = preset_types("Q4_K_M", [(n, s[1]) for n, s in reversed(names)], LLAMA8B)
    assert fwd == rev


def test_tied_embedding_takes_output_rule():
    tied = llama_like(32, 4096, 14336, 32, 8, 128256, tied=True)
    assert plan("Q4_K_M", tied, LLAMA8B)["token_embd.weight"] == "Q6_K"
    assert plan("Q2_K", tied, LLAMA8B)["token_embd.weight"] == "Q6_K"


@pytest.mark.parametrize("n_head_kv, v_type", [(8, "Q4_K"), (32, "Q3_K"), (16, "Q3_K"), (4, "Q4_K")])
def test_q2_k_attn_v_depends_on_gqa(n_head_kv, v_type):
    shape = ModelShape("llama", 32, 32, n_head_kv)
    t = plan("Q2_K", llama_like(32, 4096, 11008, 32, n_head_kv, 32000, tied=False), shape)
    assert set(by_layer(t, "attn_v", 32)) == {v_type}
    assert set(by_layer(t, "attn_output", 32)) == {"Q3_K"}
    assert set(by_layer(t, "ffn_down", 32)) == {"Q3_K"}
    assert set(by_layer(t, "attn_q", 32)) == {"Q2_K"}


def test_q3_k_m():
    t = plan("Q3_K_M", LLAMA8B_T, LLAMA8B)
    assert by_layer(t, "attn_v", 32) == ["Q5_K"] * 2 + ["Q4_K"] * 30
    assert by_layer(t, "ffn_down", 32) == ["Q5_K"] * 2 + ["Q4_K"] * 30  # i < 32 // 16
    assert set(by_layer(t, "attn_output", 32)) == {"Q4_K"}
    assert set(by_layer(t, "attn_q", 32)) == {"Q3_K"}


def test_q4_k_s_and_q3_k_l():
    t = plan("Q4_K_S", LLAMA8B_T, LLAMA8B)
    assert by_layer(t, "attn_v", 32) == ["Q5_K"] * 4 + ["Q4_K"] * 28
    assert by_layer(t, "ffn_down", 32) == ["Q5_K"] * 4 + ["Q4_K"] * 28
    t = plan("Q3_K_L", LLAMA8B_T, LLAMA8B)
    for kind in ("attn_v", "attn_output", "ffn_down"):
        assert set(by_layer(t, kind, 32)) == {"Q5_K"}


def test_70b_bumps_attn_v():
    shape = ModelShape("llama", 80, 64, 8)
    t = plan("Q4_K_S", llama_like(80, 8192, 28672, 64, 8, 128256, tied=False), shape)
    assert set(by_layer(t, "attn_v", 80)) == {"Q5_K"}
    assert set(by_layer(t, "attn_q", 80)) == {"Q4_K"}


def test_smollm2_fallback_table():
    """FINDINGS.md section 3: every 576-input tensor falls back to a legacy type; only ffn_down is K."""
    def counts(preset: str) -> Counter:
        return Counter((n.split(".")[-2], q) for n, q in plan(preset, SMOL_T, SMOL).items())

    assert counts("Q2_K") == Counter({**{(k, "Q4_0"): 30 for k in KINDS if k != "ffn_down"},
                                      ("ffn_down", "Q3_K"): 30, ("token_embd", "Q8_0"): 1})
    assert counts("Q3_K_S") == counts("Q2_K")
    t = plan("Q4_K_M", SMOL_T, SMOL)
    assert by_layer(t, "attn_v", 30) == ["Q8_0" if i in MORE_BITS_30 else "Q5_0" for i in range(30)]
    assert by_layer(t, "ffn_down", 30) == ["Q6_K" if i in MORE_BITS_30 else "Q4_K" for i in range(30)]
    for kind in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
        assert set(by_layer(t, kind, 30)) == {"Q5_0"}
    assert t["token_embd.weight"] == "Q8_0"
    assert counts("Q6_K") == Counter({**{(k, "Q8_0"): 30 for k in KINDS if k != "ffn_down"},
                                      ("ffn_down", "Q6_K"): 30, ("token_embd", "Q8_0"): 1})
    t = plan("Q3_K_M", SMOL_T, SMOL)
    assert by_layer(t, "attn_v", 30) == ["Q5_1"] * 2 + ["Q5_0"] * 28
    assert by_layer(t, "ffn_down", 30) == ["Q5_K"] + ["Q4_K"] * 29


# FINDINGS.md table: bits over all tensors, the 61 F32 norm vectors included
SMOL_BPW = dict(zip(PRESETS, (5.14, 5.14, 5.46, 5.69, 5.96, 6.17, 6.43, 6.56, 8.12)))


@pytest.mark.parametrize("preset", PRESETS)
def test_smollm2_bpw(preset):
    t = plan(preset, SMOL_T, SMOL)
    bits = 8 * sum(tensor_bytes(t[n], s) for n, s in SMOL_T.items())
    n_weights = sum(r * c for r, c in SMOL_T.values())
    n_norm = (2 * SMOL.n_layer + 1) * 576
    assert round((bits + 32 * n_norm) / (n_weights + n_norm), 2) == SMOL_BPW[preset]
    assert 0 <= SMOL_BPW[preset] - bits / n_weights < 0.015  # weight tensors alone: a hair lower


def test_rejects_unknown_preset_and_names():
    with pytest.raises(ValueError, match="Q4_K_M"):
        preset_types("Q4_0", [("token_embd.weight", 4096)], LLAMA8B)
    with pytest.raises(ValueError):
        preset_types("Q4_K_M", [("blk.0.attn_norm.weight", 4096)], LLAMA8B)
    with pytest.raises(ValueError):
        preset_types("Q4_K_M", [("blk.0.ffn_down_exps.weight", 4096)], LLAMA8B)
    with pytest.raises(ValueError, match="falcon"):
        preset_types("Q4_K_M", [("token_embd.weight", 4096)], ModelShape("falcon", 32, 71, 1))


def test_unaligned_rows_go_to_f16():
    t = preset_types("Q4_K_M", [("blk.0.attn_q.weight", 100), ("token_embd.weight", 100)], LLAMA8B)
    assert t == {"blk.0.attn_q.weight": "F16", "token_embd.weight": "F16"}
