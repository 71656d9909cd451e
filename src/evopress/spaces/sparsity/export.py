"""Sparsity export: a plain transformers checkpoint whose linear weights hold the level's exact zeros."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...io import write_json
from ..problem import Config
from .space import SparsitySpace

PROFILE = "sparsity_profile.json"


def profile(space: SparsitySpace, config: Config) -> dict[str, Any]:
    """The per-layer profile written beside every sparsity export."""
    return {
        "space": space.name, "target": space.target, "achieved": space.budget_report(config)["achieved"],
        "method": space.db.manifest["method"], "step": space.step,
        "layers": {name: {"sparsity": s, "zeros": space.zeros[u][config[u]], "weights": space.numels[u],
                          "level": space.level_labels(u)[config[u]]}
                   for u, (name, s) in enumerate(zip(space.units, space.layer_sparsity(config)))},
    }


def export(space: SparsitySpace, config: Config, out: Path, tokenizer: Any) -> dict[str, Any]:
    """A plain transformers checkpoint computing exactly ``config``: dense tensors with exact zeros.

    Leaves the model at ``config``. The per-layer profile goes to ``sparsity_profile.json``.
    """
    out = Path(out)
    space.apply(config)
    space.decoder.model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    report = space.budget_report(config)
    write_json(out / PROFILE, profile(space, config))
    return {"out": str(out), "achieved_sparsity": round(report["achieved"], 4), "zeros": report["zeros"],
            "profile": str(out / PROFILE)}
