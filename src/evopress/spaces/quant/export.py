"""Export a searched bit profile: a compressed-tensors checkpoint plus GPTQModel / llm-compressor configs.

Files written to the output directory:

* ``model.safetensors`` + ``config.json``: a compressed-tensors ``pack-quantized`` checkpoint (the
  format llm-compressor writes and vLLM reads). Each quantized linear layer stores
  ``weight_packed`` (int32, codes densely bit-packed along the input dimension: 32 codes fill exactly
  ``bits`` words), ``weight_scale`` (fp16, [out, groups]), ``weight_zero_point`` (int32, zero points
  packed the same way along the output dimension; absent for a symmetric grid, as that library
  writes it) and ``weight_shape``. Stored integers are the library's signed values plus its offset
  2^(bits-1), which are exactly our unsigned codes, so the bytes are our database's codes re-laid
  out, bit for bit. ``quantization_config`` has one config group per bitwidth whose ``targets`` are
  the exact module names (``group`` strategy, or ``channel`` for per-channel grids, ``symmetric`` as
  the database was built). Everything else (embeddings, norms, LM head) stays dense.
* ``gptqmodel_quantize_config.json``: a GPTQModel ``QuantizeConfig`` with base ``bits`` (the most
  common width) and a ``dynamic`` dict of ``"+:<anchored module regex>" -> {"bits": b}`` overrides, to
  re-quantize the same profile with GPTQModel.
* ``llmcompressor_recipe.yaml``: an llm-compressor ``GPTQModifier`` recipe with the same config groups.
* ``evopress_profile.json``: bits per layer, the grid, the budget report and these notes.

Loading: a *symmetric* export (``build-db --space quant --symmetric``) loads with plain
``AutoModelForCausalLM.from_pretrained`` (transformers 5.24, compressed-tensors 0.20.1; tested: the
same logits as the searched model). Those versions cannot load *asymmetric* pack-quantized
checkpoints (their meta-device compression keeps ``weight_zero_point`` unpacked, so the packed
tensors in the file mismatch; a checkpoint written by compressed-tensors itself fails the same way),
and their ``dequantize=True`` path decodes every dense layer with the first config group's scheme,
which is wrong for mixed bitwidths. ``load_compressed`` reads both grids: it builds the architecture
with transformers and decodes the layers with our own reader; the tests cross-check that reader
against compressed-tensors' decompressor. vLLM's compressed-tensors kernels cover 4- and 8-bit
weights and need fused projections (q/k/v, gate/up) to share a scheme, so a mixed 2-6 bit profile
is a storage/interchange artifact there, not a fast-kernel one. 3/5/6-bit packing follows
compressed-tensors >= 0.18 (dense across words; 0.19 and 0.20 identical); 0.16 and older padded each
int32 word to 32 // bits codes.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file
from torch import Tensor

from ...compressors.gptq import QuantGrid, QuantizedWeight
from ...compressors.packing import pack_codes, unpack_codes
from ...io import atomic_write, write_json
from ..problem import Config
from ..checkpoint import WEIGHTS, load_decoded, model_tensors, write_checkpoint
from .space import QuantSpace

GPTQMODEL = "gptqmodel_quantize_config.json"
RECIPE = "llmcompressor_recipe.yaml"
PROFILE = "evopress_profile.json"
_WORD = 32


def pack_rows_int32(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes [rows, cols] -> int32 [rows, ceil(cols*bits/32)]: each row one little-endian bitstream.

    That is compressed-tensors' dense packing: code j of a row sits at bits [j*bits, (j+1)*bits) of
    the row's word sequence, least significant bit first, crossing word boundaries when it must.
    """
    rows, cols = codes.shape
    padded = torch.nn.functional.pad(codes, (0, -cols % _WORD))  # 32 codes fill exactly `bits` words
    stream = pack_codes(padded, bits).view(rows, -1, 4).long()
    words = stream[..., 0] | stream[..., 1] << 8 | stream[..., 2] << 16 | stream[..., 3] << 24
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # two's complement int32
    return words[:, : -(-cols * bits // _WORD)].to(torch.int32).contiguous()


def unpack_rows_int32(packed: Tensor, bits: int, cols: int) -> Tensor:
    """Inverse of ``pack_rows_int32``."""
    rows = packed.shape[0]
    words = packed.long() & 0xFFFFFFFF
    full = -(-cols // _WORD) * bits  # words of the row padded to whole 32-code chunks
    words = torch.nn.functional.pad(words, (0, full - words.shape[1]))
    stream = torch.stack([(words >> s) & 0xFF for s in (0, 8, 16, 24)], dim=-1).to(torch.uint8).reshape(-1)
    return unpack_codes(stream, bits, (rows, full * _WORD // bits))[:, :cols].contiguous()


def to_compressed_tensors(q: QuantizedWeight) -> dict[str, Tensor]:
    """The layer's pack-quantized tensors; a symmetric grid's zero points (all 2^(b-1)) are not stored."""
    out, n = q.shape
    parts = {
        "weight_packed": pack_rows_int32(q.codes, q.grid.bits),
        "weight_scale": q.scales.contiguous(),
        "weight_shape": torch.tensor([out, n], dtype=torch.int64),
    }
    if not q.grid.symmetric:
        parts["weight_zero_point"] = pack_rows_int32(q.zeros.T.contiguous(), q.grid.bits).T.contiguous()
    return parts


def zero_points(t: dict[str, Tensor], bits: int) -> Tensor:
    """uint8 [out, groups]: the stored zero points, or the symmetric grid's 2^(bits-1) where none are."""
    out, groups = (int(t["weight_shape"][0]), t["weight_scale"].shape[1])
    if "weight_zero_point" not in t:
        return torch.full((out, groups), 1 << (bits - 1), dtype=torch.uint8)
    return unpack_rows_int32(t["weight_zero_point"].T.contiguous(), bits, out).T.contiguous()


def stored_grid(t: dict[str, Tensor], bits: int, group_size: int) -> QuantGrid:
    """The grid a layer's pack-quantized tensors are on: per-channel for one scale per row, symmetric when
    no zero points are stored."""
    per_row = t["weight_scale"].shape[1] == 1
    return QuantGrid(bits, -1 if per_row else group_size, symmetric="weight_zero_point" not in t)


def from_compressed_tensors(t: dict[str, Tensor], bits: int, group_size: int) -> QuantizedWeight:
    n = int(t["weight_shape"][1])
    return QuantizedWeight(unpack_rows_int32(t["weight_packed"], bits, n), t["weight_scale"], zero_points(t, bits),
                           stored_grid(t, bits, group_size))


def _weights_args(bits: int, group_size: int, symmetric: bool) -> dict[str, Any]:
    if group_size > 0:
        return {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": group_size}
    return {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "channel"}


def config_groups(layer_bits: dict[str, int], group_size: int, symmetric: bool) -> dict[str, dict[str, Any]]:
    """One compressed-tensors / llm-compressor config group per bitwidth, targeting exact module names."""
    groups: dict[str, dict[str, Any]] = {}
    for name, bits in layer_bits.items():
        groups.setdefault(f"group_{bits}bit", {"targets": [], "weights": _weights_args(bits, group_size, symmetric)})
        groups[f"group_{bits}bit"]["targets"].append(name)
    return dict(sorted(groups.items()))


def quantization_config(layer_bits: dict[str, int], group_size: int, symmetric: bool) -> dict[str, Any]:
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": config_groups(layer_bits, group_size, symmetric), "ignore": ["lm_head"],
            "kv_cache_scheme": None}


def gptqmodel_config(layer_bits: dict[str, int], group_size: int, damp: float, act_order: bool,
                     symmetric: bool) -> dict[str, Any]:
    """GPTQModel ``QuantizeConfig``: base bits plus ``dynamic`` per-module overrides (regex, re.match)."""
    base = Counter(layer_bits.values()).most_common(1)[0][0]
    dynamic = {f"+:^{re.escape(name)}$": {"bits": bits} for name, bits in layer_bits.items() if bits != base}
    return {"bits": base, "group_size": group_size if group_size > 0 else -1, "sym": symmetric, "desc_act": act_order,
            "static_groups": act_order, "damp_percent": damp, "dynamic": dynamic}


def llmcompressor_recipe(layer_bits: dict[str, int], group_size: int, damp: float, act_order: bool,
                         symmetric: bool) -> dict[str, Any]:
    """The GPTQModifier recipe of the same groups, column order and grid stated (never that library's defaults)."""
    return {"quant_stage": {"quant_modifiers": {"GPTQModifier": {
        "dampening_frac": damp, "block_size": 128, "actorder": "static" if act_order else None,
        "ignore": ["lm_head"], "config_groups": config_groups(layer_bits, group_size, symmetric)}}}}


def write_quantized(model: torch.nn.Module, quantized: dict[str, QuantizedWeight], out: Path, tokenizer: Any,
                    group_size: int, solver: dict[str, Any], profile: dict[str, Any]) -> dict[str, int]:
    """The checkpoint and configs with ``quantized`` layers (by module name) packed, the rest dense.

    ``solver``: the database manifest's GPTQ settings (``damp``; ``act_order`` and ``symmetric``, false
    in databases built before they were recorded). ``profile`` goes to ``evopress_profile.json`` with
    the layer bits and the formats' notes added.
    Returns the layer bits.
    """
    layer_bits = {name: q.grid.bits for name, q in quantized.items()}
    damp, act_order = solver["damp"], bool(solver.get("act_order", False))
    symmetric = bool(solver.get("symmetric", False))
    if any(q.grid.symmetric != symmetric for q in quantized.values()):
        raise ValueError(f"layers on another grid than the database's (symmetric={symmetric})")
    tensors = model_tensors(model, {f"{name}.weight" for name in quantized})
    for name, q in quantized.items():
        for key, value in to_compressed_tensors(q).items():
            tensors[f"{name}.{key}"] = value.cpu()
    write_checkpoint(model, tensors, quantization_config(layer_bits, group_size, symmetric), out, tokenizer)
    write_json(out / GPTQMODEL, gptqmodel_config(layer_bits, group_size, damp, act_order, symmetric))
    recipe = yaml.safe_dump(llmcompressor_recipe(layer_bits, group_size, damp, act_order, symmetric),
                            sort_keys=False)
    atomic_write(out / RECIPE, lambda tmp: tmp.write_text(recipe))
    write_json(out / PROFILE, {**profile, "group_size": group_size, "symmetric": symmetric, "layer_bits": layer_bits,
                               "formats": {WEIGHTS: "compressed-tensors pack-quantized (see evopress.export_quant)",
                                           GPTQMODEL: "GPTQModel QuantizeConfig with per-module dynamic bits",
                                           RECIPE: "llm-compressor GPTQModifier recipe"}})
    return layer_bits


def export_quantized(space: QuantSpace, config: Config, out: Path, tokenizer: Any) -> dict[str, Any]:
    """Write the checkpoint and configs for ``config`` (see module doc); leaves the model dense."""
    space.apply(None)
    quantized = {name: space.quantized(u, bits) for u, (name, bits) in enumerate(space.layer_bits(config).items())}
    budget = space.budget_report(config)
    write_quantized(space.decoder.model, quantized, out, tokenizer, space.group_size, space.db.manifest,
                    {"space": space.name, "target": space.target, "budget": budget})
    return {"out": str(out), "weights_bytes": (out / WEIGHTS).stat().st_size,
            "layers_per_bitwidth": budget["layers_per_bitwidth"], "accounting": budget["accounting"],
            "achieved_bits": budget["achieved"], "files": [WEIGHTS, "config.json", GPTQMODEL, RECIPE, PROFILE]}


def read_compressed_weights(path: Path) -> dict[str, Tensor]:
    """All tensors of an exported checkpoint, quantized layers decoded to float32 ``<module>.weight``."""
    from transformers import AutoConfig

    qc = AutoConfig.from_pretrained(path, local_files_only=True).quantization_config
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    raw = load_file(str(Path(path) / WEIGHTS))
    out = {k: v for k, v in raw.items() if not k.rsplit(".", 1)[-1].startswith("weight_")}
    for group in qc["config_groups"].values():
        args = group["weights"]
        for name in group["targets"]:
            parts = {k: raw[f"{name}.{k}"] for k in ("weight_packed", "weight_scale", "weight_zero_point",
                                                     "weight_shape") if f"{name}.{k}" in raw}
            out[f"{name}.weight"] = from_compressed_tensors(parts, args["num_bits"], args.get("group_size") or -1) \
                .dequantize(torch.float32)
    return out


def load_compressed(path: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """An exported checkpoint as a plain transformers model (architecture from its config.json)."""
    return load_decoded(Path(path), read_compressed_weights, dtype)


def load(path: Path, config: dict[str, Any], dtype: torch.dtype) -> torch.nn.Module | None:
    """``load_compressed`` for a pack-quantized checkpoint (``SpacePlugin.load``); None for any other."""
    qc = config.get("quantization_config") or {}
    return load_compressed(path, dtype) if qc.get("format") == "pack-quantized" else None
