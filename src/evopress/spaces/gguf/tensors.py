"""The weight tensors a GGUF quantizes, as the torch model holds them: units of the gguf space.

Every block's linear layers, the token embedding and, when not tied to it, the output head, in that
order, each with its GGUF name (gguf-py's tensor name map for the file's architecture), so the
database, the presets, the imatrix and the export speak llama.cpp's names while the fitness swaps the
torch modules' weights. A tied head is the embedding's parameter, so one unit (``token_embd``)
quantizes both, as llama.cpp does when a file has no ``output.weight``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ...database import block_linears
from ...errors import UserError
from ...models import Decoder, gguf_source
from .presets import ModelShape


@dataclass(frozen=True)
class WeightTensor:
    name: str  # the torch module holding the weight
    gguf: str  # its GGUF tensor name, e.g. blk.0.attn_q.weight
    block: int  # the decoder block it belongs to (the embedding: 0, the head: the last)
    shape: tuple[int, int]  # [rows, ne0]: ne0 (in_features, the embedding width) is what llama.cpp's blocks split
    kind: str  # "linear", "embedding" (tied: also the head) or "output"


def source_gguf(decoder: Decoder) -> Path | None:
    """The GGUF file the model was loaded from, if it was (``models.gguf_source``)."""
    files = decoder.checkpoint.files if decoder.checkpoint is not None else {}
    return gguf_source(next(iter(files.values())).parent) if files else None


def _name_map(arch: str, n_blocks: int):  # gguf.TensorNameMap
    import gguf

    archs = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in archs:
        raise UserError(f"architecture '{arch}' is unknown to gguf-py; the gguf space cannot name its tensors")
    return gguf.get_tensor_name_map(archs[arch], n_blocks)


def module_name(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def model_tensors(decoder: Decoder, arch: str) -> list[WeightTensor]:
    names = _name_map(arch, decoder.num_blocks)

    def gguf_name(module: str) -> str:
        found = names.get_name(module)
        if found is None:
            raise UserError(f"{module}: no GGUF tensor name for it in architecture '{arch}'")
        return f"{found}.weight"

    out = [WeightTensor(name, gguf_name(name), b, tuple(m.weight.shape), "linear")
           for b in range(decoder.num_blocks) for name, m in block_linears(decoder, b).items()]
    embed = decoder.model.get_input_embeddings()
    e = module_name(decoder.model, embed)
    out.append(WeightTensor(e, gguf_name(e), 0, tuple(embed.weight.shape), "embedding"))
    if decoder.head.weight is not embed.weight:
        h = module_name(decoder.model, decoder.head)
        out.append(WeightTensor(h, gguf_name(h), decoder.num_blocks - 1, tuple(decoder.head.weight.shape), "output"))
    return out


def tied(tensors: list[WeightTensor]) -> bool:
    return not any(t.kind == "output" for t in tensors)


def model_shape(decoder: Decoder, arch: str) -> ModelShape:
    """What llama.cpp's preset rules read of a model."""
    config = decoder.text_config
    heads = config.num_attention_heads
    return ModelShape(arch, decoder.num_blocks, heads, getattr(config, "num_key_value_heads", None) or heads)
