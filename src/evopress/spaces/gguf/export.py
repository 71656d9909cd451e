"""Export a searched mix: a GGUF file llama.cpp runs, and the llama-quantize options that remake it.

Files written to the output directory:

* ``model.gguf``: the source GGUF (the file the model was loaded from) with every KV field, the tokenizer
  included, and every tensor in its order; each weight tensor is the database's raw blocks in its chosen
  type, its rows put back in the file's order (llama's q/k rows are permuted in a GGUF and un-permuted by
  transformers; ``ggufio.row_order`` finds which), the rest (norms, biases) copied byte for byte.
  ``general.file_type`` says ``GUESSED``: a mix is no single llama.cpp file type.
* ``llama-quantize.txt``: the ``llama-quantize`` command that makes the same mix from a full-precision
  GGUF (one ``--tensor-type`` per tensor, with ``--imatrix`` when the database had one).
* ``imatrix.gguf``: the database's importance matrix, when it has one.
* ``evopress_profile.json``: the type of every tensor and the budget report.

The same file loads in transformers (``--model model.gguf``), which dequantizes it with gguf-py: the
weights are bit for bit those the search scored.
"""

from __future__ import annotations

import shlex
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import UserError
from ...io import write_json
from ..problem import Config
from .build import IMATRIX
from .ggufio import dequantized, read_header, row_order, tensor_type_args, write_gguf
from .space import GGUFSpace

GGUF_FILE = "model.gguf"
QUANTIZE_ARGS = "llama-quantize.txt"
PROFILE = "evopress_profile.json"
GUESSED = 1024  # llama.cpp's LLAMA_FTYPE_GUESSED: no single file type


def _heads(space: GGUFSpace, gguf_name: str) -> list[int]:
    """Head counts whose permutation a q/k tensor's rows may carry (none for any other tensor)."""
    config = space.decoder.text_config
    if ".attn_q." in gguf_name:
        return [config.num_attention_heads]
    if ".attn_k." in gguf_name:
        return [getattr(config, "num_key_value_heads", None) or config.num_attention_heads]
    return []


def _rows(space: GGUFSpace, u: int, source: Any) -> np.ndarray | None:
    """The file's row order of unit ``u`` (None: the torch model's)."""
    heads = _heads(space, space.gguf_names[u])
    if not heads:
        return None
    try:
        return row_order(dequantized(source, space.gguf_names[u]), space.dense_weight(u).float().numpy(), heads)
    except ValueError as e:
        raise UserError(f"{space.gguf_names[u]}: the model's rows match no known order of the source GGUF's ({e})")


def export_gguf(space: GGUFSpace, config: Config, out: Path, tokenizer: Any) -> dict[str, Any]:
    if space.db.manifest.get("source") is None:
        raise UserError("this gguf database was built without a source GGUF; rebuild it with --model FILE.gguf")
    source_path = Path(space.db.manifest["source"])
    if not source_path.is_file():
        raise UserError(f"the source GGUF of database {space.db.root} is gone: {source_path}")
    source = read_header(source_path)
    missing = [n for n in space.gguf_names if n not in source.tensors]
    if missing:
        raise UserError(f"source GGUF {source_path} lacks {', '.join(missing[:3])}: not the database's model")
    tensors = {}
    for u, name in enumerate(space.gguf_names):
        raw, rows = space.raw(u, config[u]), _rows(space, u, source)
        tensors[name] = (space.types[u][config[u]], raw if rows is None else raw[rows])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    size = write_gguf(source, out / GGUF_FILE, tensors, file_type=GUESSED)
    types = space.tensor_types(config)
    files = [GGUF_FILE, QUANTIZE_ARGS, PROFILE]
    imatrix = space.db.root / IMATRIX
    if space.imatrix and imatrix.is_file():
        shutil.copyfile(imatrix, out / IMATRIX)
        files.append(IMATRIX)
    base = Counter(types.values()).most_common(1)[0][0]
    command = ["llama-quantize", *(["--imatrix", IMATRIX] if IMATRIX in files else []), *tensor_type_args(types),
               "MODEL-F16.gguf", GGUF_FILE, base]
    (out / QUANTIZE_ARGS).write_text(shlex.join(command) + "\n")
    budget = space.budget_report(config)
    write_json(out / PROFILE, {"space": space.name, "target": space.target, "source": str(source_path),
                               "types": types, "budget": budget})
    return {"out": str(out), "file_bytes": size, "tensor_bytes": budget["bytes"],
            "bits_per_weight": budget["bits_per_weight"], "tensors_per_type": budget["tensors_per_type"],
            "files": files}
