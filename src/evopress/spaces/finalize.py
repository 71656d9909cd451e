"""Finalize: re-solve a chosen profile's layers on the inputs of the already-finalized model.

A level database calibrates every level of a layer on one fixed input (the dense model's, or a
calibration bitwidth's), so that any profile can be stitched from it. Once a profile is chosen that
constraint is gone: block by block, each layer is solved again at its chosen level only, on the
outputs of the blocks already finalized (the standard sequential GPTQ/SparseGPT scheme), and the
result is installed before the next block's inputs are computed. Memory and time are those of one
database pass at one level.

The re-solved levels are written as an *overlay database*: a directory holding only the chosen level
of each re-solved layer, under the same tensor names as in the base database (the space's ``--db``),
and a manifest that is the base's plus a ``finalized`` record naming the base. ``Database.open``
reads a layer's other levels from the base, so every command that takes the base database takes the
overlay. A killed finalize resumes like ``build-db``: layer files are written atomically and kept
when the settings match.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..compressors.hessian import HessianAccumulator
from ..data import TokenPool
from ..database import MANIFEST, BuildLog, Database, calibrate_blocks, data_fingerprint, save_layer
from ..io import read_json
from ..models import Decoder
from ..placement import offload_hook

OVERLAY = "finalized"  # the manifest entry that makes a database an overlay of its base


@dataclass
class LayerJob:
    """One layer to re-solve at its chosen level: the level's tensor names, its solver and decoder."""

    keys: list[str]  # the level's tensors in a layer file of the base database
    solve: Callable[[nn.Linear, HessianAccumulator], dict[str, torch.Tensor]]
    weight: Callable[[dict[str, torch.Tensor]], torch.Tensor]  # the weight the solved tensors decode to


def finalize_layers(decoder: Decoder, pool: TokenPool, base: Database, jobs: dict[str, LayerJob], out: Path,
                    batch_size: int, progress: bool, true_sequential: bool = False) -> Path:
    """Re-solve ``jobs`` (by module name) block by block into the overlay database ``out``; returns it.

    ``true_sequential``: within a block too, each group of layers reading one input (q/k/v, o, gate/up,
    down) is solved on the inputs left by the groups before it (``database.calibrate_blocks``).

    The model's weights are left as they were. Modules outside ``jobs`` keep whatever the caller put in
    them (a dropped sub-block stays dropped).
    """
    start = time.perf_counter()
    settings = {"base": str(base.root.resolve()), "data_fingerprint": data_fingerprint(pool),
                "layers": {name: job.keys for name, job in jobs.items()}, "true_sequential": true_sequential}
    if (out / MANIFEST).is_file() and read_json(out / MANIFEST).get(OVERLAY, {}).get("settings") == settings:
        return out  # finished before (a rerun after the result was written, or after a kill just before)
    log = BuildLog(out, settings)
    # an offloaded layer needs nothing: what a block's work puts into it goes back to the meta device after
    originals = {m: m.weight.data for name, m in decoder.linear_layers().items()
                 if name in jobs and offload_hook(m) is None}

    def compress(b: int, layers: dict[str, nn.Linear], hessians: dict[str, HessianAccumulator]) -> None:
        for name, layer in layers.items():
            job = jobs.get(name)
            if job is None:
                continue
            tensors = log.done(name, job.keys)
            if tensors is None:
                tensors = job.solve(layer, hessians[name])
                save_layer(out, name, tensors)
            # a new tensor, never written in place: the dense weight may share storage with the checkpoint
            layer.weight.data = job.weight(tensors).to(layer.weight.device, layer.weight.dtype)

    try:
        calibrate_blocks(decoder, pool, batch_size, compress, progress, true_sequential, desc="finalize")
    finally:
        for module, weight in originals.items():
            module.weight.data = weight
    log.finish({**{k: v for k, v in base.manifest.items() if k != "format"},
                OVERLAY: {"base": settings["base"], "settings": settings, "data": pool.source,
                          "calibration": {"tokens": pool.tokens, "seq_len": pool.seq_len,
                                          "inputs": "the finalized model, " + ("layer group by layer group"
                                                                               if true_sequential else
                                                                               "block by block")},
                          "seconds": round(time.perf_counter() - start, 1)}})
    return out
