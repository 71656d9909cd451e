"""Load Hugging Face causal LMs and expose their decoder as a sequence of blocks.

Everything else in evopress (spaces, fitness, databases) works on the ``Decoder`` view: a list of
blocks with attention and MLP sub-modules, a way to enter the block stack (embeddings plus whatever
keyword arguments the architecture passes to its layers) and a way to leave it (final norm, LM head).
Blocks are found by structure, so Llama, Mistral, Qwen2, Phi-3 and Gemma families share one path.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import assets
from .errors import UserError
from .io import cache_dir, read_json, write_json
from .hostmem import map_large_allocations
from .placement import (CheckpointReader, device_map_for, execution_device, for_share, parse_device_map,
                        parse_max_memory, torchrun_share)

DEFAULT_MODEL = "default"
GGUF_SOURCE = "evopress-source.json"  # in a converted GGUF's checkpoint directory: the file it came from
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_norm")
HEAD_BLOCK_BYTES = 256 << 20  # default bound on an LM-head temporary: fp32 weight rows, a logit block


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UserError(f"unknown device '{device}'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: this torch has no usable CUDA device (CPU build or no GPU); "
                        "use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return dev


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """fp32 on CPU (bf16 matmuls are slow on AVX2-only CPUs), bf16 on accelerators."""
    if dtype in (None, "", "auto"):
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise UserError(f"unknown dtype '{dtype}' (choose from {', '.join(table)})")
    return table[dtype]


@dataclass(frozen=True)
class Hardware:
    """Where and in which precision a model runs (``--device``, ``--dtype``, ``--device-map``, ``--max-memory``).

    Placement never changes what is computed, so only the dtype enters a run's fingerprint.
    """

    device: str | None = None
    dtype: str | None = None
    device_map: str | None = None  # auto, balanced, or JSON {module: device}
    max_memory: str | None = None  # e.g. "0=70GiB,1=70GiB,cpu=200GiB"

    def or_(self, default: "Hardware") -> "Hardware":
        """These settings, with ``default``'s where none was given (e.g. a saved recipe's)."""
        return Hardware(*(a if a is not None else b for a, b in zip(
            (self.device, self.dtype, self.device_map, self.max_memory),
            (default.device, default.dtype, default.device_map, default.max_memory))))

    def check(self) -> None:
        """Refuse a malformed setting before anything is loaded.

        Only the spelling: whether the device exists is checked when the model loads, so a recipe saved
        on a GPU machine still reads (and evaluates with --device cpu) on a machine without one.
        """
        if self.device not in (None, "", "auto"):
            try:
                torch.device(self.device)
            except RuntimeError as e:
                raise UserError(f"unknown device '{self.device}'") from e
        resolve_dtype(self.dtype, torch.device("cpu"))
        parse_device_map(self.device_map)
        parse_max_memory(self.max_memory)

    def load(self, spec: str | None, log: Callable[[str], None] = lambda msg: None) -> "LoadedModel":
        map_large_allocations()  # before the big host temporaries (weights, pool, teacher): hostmem
        device = resolve_device(self.device)
        device_map, max_memory = parse_device_map(self.device_map), parse_max_memory(self.max_memory)
        share = torchrun_share() if device_map is not None or max_memory is not None else None
        if share is not None:  # a torchrun rank: its replica over its own GPUs only (placement.gpu_share)
            from accelerate.utils import get_max_memory

            device = torch.device(f"cuda:{share[0]}")
            device_map, max_memory = for_share(device_map or "auto", max_memory, share, get_max_memory())
        return load_model(spec, device, resolve_dtype(self.dtype, device), log, device_map, max_memory)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    name: str  # what the user asked for, resolved to a path or "default"
    path: Path  # directory of the HF checkpoint actually loaded

    @cached_property
    def decoder(self) -> "Decoder":
        """The one structural view of this model: every space built on the model must share it."""
        return Decoder(self.model, CheckpointReader.open(self.path))


def _file_key(path: Path) -> str:
    """Cheap content key for a possibly multi-GB file: size plus hash of the first 4 MiB."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(4 << 20))
    return h.hexdigest()[:16]


def convert_gguf(gguf: Path, log: Callable[[str], None] = lambda msg: None) -> Path:
    """Dequantize a GGUF file into an fp32 HF checkpoint once, and cache it.

    transformers can read GGUF directly, but dequantizes it on every load; the safetensors cache
    is read without that work and needs neither gguf nor accelerate.
    """
    target = cache_dir() / "models" / f"{gguf.stem}-{_file_key(gguf)}"
    if (target / "config.json").is_file():
        if gguf_source(target) != gguf.resolve():  # a cache made before sources were recorded, or a moved file
            write_json(target / GGUF_SOURCE, {"file": str(gguf.resolve())})
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # said once the file reads as GGUF: a truncated or foreign file is refused in one line
        log(f"converting {gguf.name} to an fp32 checkpoint cached in {target.parent} (once per file; dequantizing "
            "takes minutes on a CPU)")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError, struct.error, IndexError) as e:  # struct/index: a truncated file
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot load GGUF {gguf} (truncated or not a GGUF model?): {detail}") from e
    # transformers 5 refuses to save a model that still carries its GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_json(tmp / GGUF_SOURCE, {"file": str(gguf.resolve())})
    tmp.rename(target)
    log("conversion done")
    return target


def gguf_source(checkpoint: Path | None) -> Path | None:
    """The GGUF file a converted checkpoint directory was made from (None: not made from one). Why: a GGUF
    export keeps that file's metadata and tokenizer (``spaces/gguf``)."""
    path = None if checkpoint is None else Path(checkpoint) / GGUF_SOURCE
    recorded = read_json(path).get("file") if path is not None and path.is_file() else None
    return Path(recorded) if recorded else None


def resolve_model_path(spec: str | None, log: Callable[[str], None] = lambda msg: None) -> tuple[str, Path]:
    if spec in (None, "", DEFAULT_MODEL):
        return DEFAULT_MODEL, convert_gguf(assets.default_model_gguf(), log)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path), convert_gguf(path, log)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model directory {path} has no config.json")
        return str(path), path
    found = "is not a model directory or a .gguf file" if path.exists() else "not found"
    raise UserError(f"model '{spec}' {found} (give a local HF model directory, a .gguf file, "
                    "or omit --model for the embedded default)")


def load_model(spec: str | None, device: torch.device, dtype: torch.dtype,
               log: Callable[[str], None] = lambda msg: None, device_map: str | dict[str, Any] | None = None,
               max_memory: dict[Any, str | int] | None = None) -> LoadedModel:
    """The model straight onto its device(s) from memory-mapped safetensors: no full copy in host RAM.

    Without ``device_map``/``max_memory`` everything goes to ``device``; with them the decoder
    blocks are placed by accelerate (``placement.device_map_for``) and the rest stays on ``device``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars are the ones that matter

    name, path = resolve_model_path(spec, log)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        placed = {"": device} if device_map is None and max_memory is None else \
            _block_map(path, device, dtype, device_map or "auto", max_memory)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, local_files_only=True, attn_implementation="sdpa", device_map=placed,
            offload_folder=str(cache_dir() / "offload"))
    except (ValueError, KeyError, OSError) as e:
        raise UserError(f"cannot load model from {path}: {str(e).splitlines()[0]}") from e
    model.eval().requires_grad_(False)
    if device_map is not None or max_memory is not None:
        log(f"placement: {_placement_summary(getattr(model, 'hf_device_map', {}))}")
    return LoadedModel(model, tokenizer, name, path)


def _block_map(path: Path, device: torch.device, dtype: torch.dtype, device_map: str | dict[str, Any],
               max_memory: dict[Any, str | int] | None) -> dict[str, Any]:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path, local_files_only=True),
                                                 dtype=dtype)
    decoder = Decoder(empty)
    prefix = next(n for n, m in empty.named_modules() if m is decoder.layers)
    return device_map_for(empty, prefix, decoder.num_blocks, device, device_map, max_memory, dtype)


def _placement_summary(device_map: dict[str, Any]) -> str:
    counts: dict[str, int] = {}
    for where in device_map.values():
        counts[str(where)] = counts.get(str(where), 0) + 1
    return ", ".join(f"{n} module group(s) on {where}" for where, n in counts.items())


def _child_by_name(module: nn.Module, names: tuple[str, ...], class_hint: tuple[str, ...]) -> str | None:
    for name, child in module.named_children():
        if name in names:
            return name
    for name, child in module.named_children():
        if any(h in type(child).__name__ for h in class_hint):
            return name
    return None


class _Catch(nn.Module):
    """Stands in for a decoder layer for one forward: records its inputs and passes them through."""

    def __init__(self, layer: nn.Module, sink: list):
        super().__init__()
        self.sink = sink
        # Some architectures (Qwen2, Gemma) pick the attention mask by the layer's attention type.
        for attr in ("attention_type", "is_sliding"):
            if hasattr(layer, attr):
                setattr(self, attr, getattr(layer, attr))

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.sink.append((hidden_states, args, kwargs))
        return hidden_states


def head_rows(weight: torch.Tensor, block_bytes: int) -> int:
    """Vocabulary rows of a head weight to upcast to float32 at once: all of a float32 weight (no copy is
    made), else as many as fit ``block_bytes``."""
    if weight.dtype == torch.float32:
        return len(weight)
    return max(1, block_bytes // (4 * weight.shape[1]))


@dataclass
class BlockInputs:
    """What the model hands its first block, plus the per-layer extra arguments (masks, RoPE)."""

    hidden: torch.Tensor
    layer_args: list[tuple[tuple, dict]]


class Decoder:
    """Structural view of a causal LM as embeddings -> blocks -> norm -> head."""

    def __init__(self, model: nn.Module, checkpoint: CheckpointReader | None = None):
        self.model = model
        self.checkpoint = checkpoint  # where dense weights can be re-read from, if the model came from disk
        self.config = getattr(model, "config", None)
        # What describes the block stack (block count, layer types): a multimodal wrapper's text_config.
        self.text_config = self.config.get_text_config(decoder=True) if hasattr(self.config, "get_text_config") \
            else self.config
        self.layers, self.base = self._find_layers(model)
        block = self.layers[0]
        attn = _child_by_name(block, _ATTN_NAMES, ("Attention",))
        mlp = _child_by_name(block, _MLP_NAMES, ("MLP", "FeedForward", "Moe", "MoE"))
        norm = _child_by_name(self.base, _NORM_NAMES, ())
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        missing = [what for what, v in (("attention sub-module", attn), ("MLP sub-module", mlp),
                                        ("final norm", norm), ("LM head", head)) if v is None]
        if missing:
            raise UserError(f"unsupported architecture {type(model).__name__}: could not find "
                            f"{', '.join(missing)} in {type(block).__name__}")
        self.attn_attr: str = attn
        self.mlp_attr: str = mlp
        self.norm: nn.Module = getattr(self.base, norm)
        self.head: nn.Module = head
        self.softcap: float | None = getattr(self.config, "final_logit_softcapping", None)

    @staticmethod
    def _find_layers(model: nn.Module) -> tuple[nn.ModuleList, nn.Module]:
        """The decoder stack is the largest ModuleList of identical modules."""
        best = None
        for name, module in model.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) > 0 and \
                    len({type(m) for m in module}) == 1:
                size = sum(p.numel() for p in module.parameters())
                if best is None or size > best[0]:
                    best = (size, name)
        if best is None:
            raise UserError(f"unsupported architecture {type(model).__name__}: no decoder block list found")
        name = best[1]
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        return model.get_submodule(name), parent

    @property
    def num_blocks(self) -> int:
        return len(self.layers)

    @property
    def device(self) -> torch.device:
        """Where candidates enter and leave the block stack (the head's device; blocks may be elsewhere)."""
        return execution_device(self.head)

    def attn(self, b: int) -> nn.Module:
        return getattr(self.layers[b], self.attn_attr)

    def mlp(self, b: int) -> nn.Module:
        return getattr(self.layers[b], self.mlp_attr)

    def linear_layers(self) -> dict[str, nn.Linear]:
        """All compressible linear layers of the blocks, by full module name, in block order."""
        out = {}
        prefix = next(n for n, m in self.model.named_modules() if m is self.layers)
        for b, layer in enumerate(self.layers):
            for name, module in layer.named_modules():
                if isinstance(module, nn.Linear):
                    out[f"{prefix}.{b}.{name}"] = module
        return out

    @torch.inference_mode()
    def enter(self, input_ids: torch.Tensor) -> BlockInputs:
        """Run the embeddings and capture what every block receives, without running any block."""
        sink: list = []
        originals = list(self.layers)
        try:
            for i, layer in enumerate(originals):
                self.layers[i] = _Catch(layer, sink)
            self.base(input_ids=input_ids.to(self.device), use_cache=False)
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer
        return BlockInputs(sink[0][0], [(args, kwargs) for _, args, kwargs in sink])

    def run_block(self, b: int, hidden: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
        args, kwargs = inputs.layer_args[b]
        out = self.layers[b](hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    @torch.inference_mode()
    def final_hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The residual stream after the last block (before the final norm), keeping no other boundary."""
        inputs = self.enter(input_ids)
        h = inputs.hidden
        for b in range(self.num_blocks):
            h = self.run_block(b, h, inputs)
        return h

    @torch.inference_mode()
    def run_blocks(self, input_ids: torch.Tensor) -> Iterator[torch.Tensor]:
        """Yield the residual stream at every block boundary 0..L (before the final norm)."""
        inputs = self.enter(input_ids)
        h = inputs.hidden
        yield h
        for b in range(self.num_blocks):
            h = self.run_block(b, h, inputs)
            yield h

    def logits(self, normed: torch.Tensor, block_bytes: int = HEAD_BLOCK_BYTES,
               head: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
        """Logits from hidden states that already went through the final norm, computed in float32.

        Computed, not only returned, in float32: a bf16 head rounds every logit to 8 significant bits, a
        bias that the KL fitness would see against its float32 hidden-space products (``fitness``). bf16
        and fp16 values are exact in float32, so this is the model's own head without the output rounding.
        A half-precision weight is upcast ``head_rows`` vocabulary rows at a time: a whole float32 copy of
        a 128k x 8k head would be 4 GB. ``head``: another (weight, bias) in the head's place (the teacher's
        dense copy when the head itself is compressed).
        """
        weight, bias = head if head is not None else (self.head.weight, getattr(self.head, "bias", None))
        x, rows = normed.float(), head_rows(weight, block_bytes)
        blocks = [F.linear(x, weight[i: i + rows].float(), None if bias is None else bias[i: i + rows].float())
                  for i in range(0, len(weight), rows)]
        logits = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-1)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
