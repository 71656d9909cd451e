"""Gguf database build: every weight tensor quantized to every requested llama.cpp type, as raw GGUF blocks.

A tensor's levels are the requested types after llama.cpp's shape fallback (``types.fallback``), each
stored once as the bytes llama.cpp would write (uint8 [rows, row bytes], in the torch model's row
order), never dequantized. The importance matrix is llama.cpp's: per input column, the mean square
of the activations entering the tensor over the calibration tokens, on the dense model. The block
linears' come from the Hessian pass every database build makes (its diagonal over the token count),
the head's (and a tied embedding's) from the final norm's output; the embedding lookup has none, as
in llama.cpp. The same statistics are written as ``imatrix.gguf`` under GGUF names, which
``llama-quantize --imatrix`` reads. ``--no-imatrix`` quantizes without one (llama.cpp's default).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ...compressors.hessian import HessianAccumulator
from ...data import TokenPool
from ...database import BuildLog, calibrate_blocks, data_fingerprint, layer_file, model_fingerprint, save_layer
from ...errors import UserError
from ...models import Decoder
from ...placement import resident
from .ggufio import read_header, write_imatrix
from .presets import PRESETS, preset_types
from .tensors import WeightTensor, model_shape, model_tensors, source_gguf
from .types import DEFAULT_TYPES, NEEDS_IMATRIX, fallback, parse_types, quantize, tensor_bytes

IMATRIX = "imatrix.gguf"
CONVERT_HINT = ("the gguf space needs a GGUF model (--model FILE.gguf): the export keeps its metadata and tokenizer; "
                "convert an HF directory with llama.cpp: python convert_hf_to_gguf.py DIR --outtype f16 --outfile "
                "model.gguf")


def tensor_levels(types: Sequence[str], shape: Sequence[int]) -> list[str]:
    """The distinct types a tensor stores for ``types`` (after the fallback), cheapest first."""
    found = {fallback(t, shape[1]) for t in types}
    return sorted(found, key=lambda t: (tensor_bytes(t, shape), types.index(t) if t in types else len(types)))


def preset_sizes(decoder: Decoder, arch: str, tensors: Sequence[WeightTensor], levels: dict[str, list[str]]
                 ) -> dict[str, dict[str, Any]]:
    """Each llama.cpp preset's bytes and bits per weight (rounded up: a --target that admits it) over the
    tensors, and the types it needs that the database lacks. Why: EvoPress is compared with a preset at
    the preset's own size, which the user then passes as --target."""
    numel = sum(r * c for r, c in (t.shape for t in tensors))
    shape, rows = model_shape(decoder, arch), [(t.gguf, t.shape[1]) for t in tensors]
    out = {}
    for preset in PRESETS:
        types = preset_types(preset, rows, shape)
        size = sum(tensor_bytes(types[t.gguf], t.shape) for t in tensors)
        out[preset] = {"bytes": size, "bits_per_weight": math.ceil(8e6 * size / numel) / 1e6,
                       "missing_types": sorted({types[t.gguf] for t in tensors} - {q for t in tensors
                                                                                   for q in levels[t.name]})}
    return out


def _summary(presets: dict[str, dict[str, Any]]) -> list[str]:
    return [f"preset {name}: {p['bytes']:,} bytes, --target {p['bits_per_weight']:.6f}"
            + (f" (needs --types with {','.join(p['missing_types'])})" if p["missing_types"] else "")
            for name, p in presets.items()]


def _mean_squares(acc: HessianAccumulator) -> tuple[np.ndarray, int]:
    return (acc.input_sq_norms() / acc.n_tokens).cpu().numpy(), acc.n_tokens


def _head_statistics(decoder: Decoder, states: list[torch.Tensor]) -> tuple[np.ndarray, int]:
    """Mean squares of the LM head's input (the final norm's output) per column, and the token count."""
    acc = HessianAccumulator(states[0].shape[-1], device=states[0].device)
    with torch.no_grad():
        for h in states:
            acc.add(decoder.norm(h))
    return _mean_squares(acc)


def build_gguf_database(decoder: Decoder, pool: TokenPool, out: Path, types: Sequence[str], imatrix: bool,
                        batch_size: int, progress: bool, arch: str, source: Path | None) -> dict[str, Any]:
    start = time.perf_counter()
    tensors = model_tensors(decoder, arch)
    levels = {t.name: tensor_levels(types, t.shape) for t in tensors}
    fingerprint, data_fp = model_fingerprint(decoder.model), data_fingerprint(pool)
    build = BuildLog(out, {"space": "gguf", "model_fingerprint": fingerprint, "data_fingerprint": data_fp,
                           "types": list(types), "imatrix": imatrix, "dtype": str(decoder.head.weight.dtype)})
    by_name = {t.name: t for t in tensors}
    stats: dict[str, tuple[np.ndarray, int]] = {}  # GGUF name -> (mean squares per column, tokens)

    def solve(t: WeightTensor, weight: torch.Tensor) -> None:
        if build.done(t.name, levels[t.name]) is not None:  # solved before the build was interrupted
            return
        w = weight.detach().to("cpu", torch.float32).numpy()
        im = stats[t.gguf][0] if t.gguf in stats else None
        save_layer(out, t.name, {q: torch.from_numpy(quantize(w, q, im)) for q in levels[t.name]})

    def compress(b: int, layers: dict[str, nn.Linear], hessians: dict[str, HessianAccumulator]) -> None:
        for name, layer in layers.items():
            stats[by_name[name].gguf] = _mean_squares(hessians[name])
            solve(by_name[name], layer.weight)

    if imatrix:
        final = calibrate_blocks(decoder, pool, batch_size, compress, progress, desc="gguf database")
        head = next(t for t in reversed(tensors) if t.kind != "linear")  # the output, or the tied embedding
        stats[head.gguf] = _head_statistics(decoder, final)
    else:
        for b in range(decoder.num_blocks):
            with resident(decoder.layers[b]):
                for t in tensors:
                    if t.kind == "linear" and t.block == b:
                        solve(t, decoder.model.get_submodule(t.name).weight)
    for t in tensors:
        if t.kind != "linear":
            solve(t, decoder.model.get_submodule(t.name).weight)
    if imatrix:
        write_imatrix(out / IMATRIX, {k: v for k, (v, _) in stats.items()}, {k: n for k, (_, n) in stats.items()},
                      pool.seq_len, [pool.source])
    manifest = {
        "space": "gguf", "model_fingerprint": fingerprint, "data": pool.source, "data_fingerprint": data_fp,
        "calibration": {"tokens": pool.tokens, "seq_len": pool.seq_len},
        "method": "llama.cpp quantizers (libgguf 0.2.2)",
        "types": list(types),
        "imatrix": imatrix,
        "source": str(source) if source is not None else None,
        "arch": arch,
        "presets": (presets := preset_sizes(decoder, arch, tensors, levels)),
        "summary": _summary(presets),
        "tensors": {t.name: {"gguf": t.gguf, "shape": list(t.shape), "kind": t.kind, "block": t.block,
                             "types": levels[t.name]} for t in tensors},
        "bytes": sum(layer_file(out, t.name).stat().st_size for t in tensors),
        "seconds": round(time.perf_counter() - start, 1),
    }
    build.finish(manifest)
    return manifest


def build(decoder: Decoder, pool: TokenPool, options: dict[str, Any], out: Path, batch_size: int,
          progress: bool) -> dict[str, Any]:
    """The plugin's builder: ``build-db --space gguf`` options to ``build_gguf_database``."""
    types = parse_types(options["types"] or ",".join(DEFAULT_TYPES))
    needs = [t for t in types if t in NEEDS_IMATRIX]
    if options["no_imatrix"] and needs:
        raise UserError(f"--types {','.join(needs)} need an importance matrix (llama-quantize refuses them "
                        "without one): drop --no-imatrix or those types")
    source = source_gguf(decoder)
    if source is None:
        raise UserError(CONVERT_HINT)
    if not source.is_file():
        raise UserError(f"the GGUF this model was converted from is gone: {source}; give --model FILE.gguf again")
    return build_gguf_database(decoder, pool, out, types, not options["no_imatrix"], batch_size, progress,
                               read_header(source).arch, source)
