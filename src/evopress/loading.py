"""``evopress.load_compressed``: any checkpoint ``evopress export`` writes, as a transformers model.

Most exports are plain checkpoints that ``from_pretrained`` reads as they are. Some carry layers
that transformers 5 cannot decode (mixed-bitwidth pack-quantized, sparse-bitmask) or sub-blocks it
would still compute although they add nothing (a depth export's dropped attention or MLP): the
space that wrote them says so in config.json and reads them back (``SpacePlugin.load``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .spaces import PLUGINS


def load_compressed(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The exported model at ``path`` in eval mode, computing exactly what the export computes."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not an exported checkpoint: cannot read its config.json ({e})") from e
    for plugin in PLUGINS.values():
        if plugin.load is not None and (model := plugin.load(path, config, dtype)) is not None:
            return model
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).eval().requires_grad_(False)
