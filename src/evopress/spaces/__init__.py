"""Compression spaces: what a level means for each unit, and how to put a configuration in the model."""

from typing import Any

from ..errors import UserError
from ..models import Decoder
from .base import Config, Problem, Space
from .constraints import ConstrainedSpace, parse_rules
from .drop import DropSpace
from .quant import QuantSpace
from .sparsity import SparsitySpace

SPACES: dict[str, type[Space]] = {"drop": DropSpace, "quant": QuantSpace, "sparsity": SparsitySpace}


def make_space(name: str, decoder: Decoder, target: float, options: dict[str, Any]) -> Space:
    if name not in SPACES:
        raise UserError(f"unknown space '{name}' (choose from {', '.join(SPACES)})")
    options = dict(options)
    rules = options.pop("rules", None)
    space = SPACES[name](decoder, target, **options)
    return ConstrainedSpace(space, parse_rules(rules)) if rules else space


__all__ = ["Config", "Problem", "Space", "SPACES", "make_space"]
