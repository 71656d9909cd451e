"""The reference depth search's files: one line per decoder block, in block order, naming what it drops.

Each line is ``none``, ``attn``, ``mlp`` or ``attn+mlp`` and ends in a newline, exactly as the
reference writes ``layer_drop_config.txt`` (and ships it for Llama-2/3/3.1 and Mistral at 1/16 to
1/2). The line count must equal the model's block count. A whole-block search
(``--drop_entire_block``) writes only ``none`` and ``attn+mlp``; the file cannot tell it from a
sub-block search that happened to drop whole blocks, and both describe the same model, so it is read
with whatever ``--granularity`` was given (sub-block by default, the paper's space).
"""

from __future__ import annotations

from ...errors import UserError
from ..plugin import ConfigFormat
from ..problem import Config
from .space import DropSpace

LINES = {"none": (False, False), "attn": (True, False), "mlp": (False, True), "attn+mlp": (True, True)}
WORDS = {mask: word for word, mask in LINES.items()}


def read(text: str, space: DropSpace, source: str) -> Config:
    lines = text.splitlines()
    while lines and not lines[-1].strip():  # a blank line or two at the end is harmless
        lines.pop()
    blocks = space.num_blocks
    masks = []
    for n, line in enumerate(lines, 1):
        word = line.strip()
        if word not in LINES:
            raise UserError(f"{source}:{n}: expected what block {n - 1} drops (none, attn, mlp or attn+mlp), "
                            f"got '{line}'")
        if n > blocks:
            raise UserError(f"{source}:{n}: a line for block {n - 1}, but the model has {blocks} blocks "
                            f"(one line each)")
        if space.granularity == "block" and word in ("attn", "mlp"):
            raise UserError(f"{source}:{n}: '{word}' drops part of block {n - 1}; --granularity block drops "
                            "whole blocks only (use --granularity sublayer)")
        masks.append(LINES[word])
    if len(masks) < blocks:
        raise UserError(f"{source}:{max(len(lines), 1)}: the file ends after {len(masks)} blocks, but the model has "
                        f"{blocks} (one line each)")
    return space.config_from_masks(masks)


def write(space: DropSpace, config: Config) -> str:
    return "".join(f"{WORDS[mask]}\n" for mask in space.masks(config))


REFERENCE = ConfigFormat(
    help="the reference depth search's layer_drop_config.txt: per block none, attn, mlp or attn+mlp",
    fits_line=LINES.__contains__,
    read=read,
    write=write,
)
