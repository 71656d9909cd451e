"""Writing and reading checkpoints whose compressed layers transformers cannot store by itself.

The quantized and sparse exports keep every tensor of the model except their compressed layers'
weights, which they replace with their own tensors; config.json carries the ``quantization_config``
that says how. Reading builds the architecture with transformers and loads the decoded tensors.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ..errors import UserError
from ..io import atomic_write

WEIGHTS = "model.safetensors"


def model_tensors(model: nn.Module, skip: set[str]) -> dict[str, Tensor]:
    """The model's own tensors except ``skip``; tied tensors are written once (first name wins)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        if key in skip or value.data_ptr() in seen:
            continue
        seen.add(value.data_ptr())
        out[key] = value.detach().cpu().contiguous()
    return out


def write_checkpoint(model: nn.Module, tensors: dict[str, Tensor], quantization_config: dict[str, Any],
                     out: Path, tokenizer: Any) -> Path:
    """``tensors`` as the weights file, the model's config with ``quantization_config``, the tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    hf_config = copy.deepcopy(model.config)
    hf_config.quantization_config = quantization_config
    hf_config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out / WEIGHTS


def load_decoded(path: Path, decode: Callable[[Path], dict[str, Tensor]], dtype: torch.dtype) -> nn.Module:
    """The architecture of ``path``'s config.json (its quantization_config removed) with ``decode(path)``'s
    tensors, every parameter accounted for (tied parameters share storage with a loaded one)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = decode(Path(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {params[k].data_ptr() for k in state if k in params}
    untied = [k for k in missing if k not in params or params[k].data_ptr() not in loaded]
    if unexpected or untied:
        raise UserError(f"{path} does not match its config: missing {untied[:3]}, unexpected {unexpected[:3]}")
    return model.eval().requires_grad_(False)
