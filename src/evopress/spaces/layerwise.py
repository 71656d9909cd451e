"""The shared base of every per-linear-layer space backed by a level database (sparsity, quant, ...).

Such a space has one unit per linear layer of the decoder blocks and one stored variant per level.
What they all need is here, once: opening and checking the database, putting a level into a layer
(only the layers that changed), restoring the dense weight, a bounded cache of decoded levels, the
same space at another budget on the same opened database (``retarget``), and the block-sequential
database build with its resumable log and manifest. A subclass says how a stored level becomes a
weight (``decode``) and what the budget is (``set_target``); a builder says how to solve one layer.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..compressors.hessian import HessianAccumulator
from ..data import TokenPool
from ..database import (DECODED_CACHE_ENV, DEFAULT_DECODED_CACHE_GB, BuildLog, ByteLRU, Database, VariantCache,
                        cache_budget, calibrate_blocks, data_fingerprint, layer_file, linear_units, model_fingerprint,
                        save_layer, tensor_bytes)
from ..errors import UserError
from ..hostmem import long_lived, release_file_pages
from ..models import Decoder
from ..placement import WeightOverride, offload_hook, to_device
from .plugin import CliOption
from .problem import Config
from .space import RetargetableSpace


def absolute_path(path: str | None) -> str | None:
    """Databases are stored by absolute path so a result evaluates from any working directory."""
    return str(Path(path).resolve()) if path else None


DB_OPTION = CliOption(("--db",), "db", "level database built by build-db", convert=absolute_path)


def group_rule_option(space: str, default: str, meaning: str) -> CliOption:
    return CliOption(("--group-rule",), "group_rule", f"{space}: which layers may trade levels: {meaning} "
                     f"(default {default})", default=default)


class LayerwiseSpace(RetargetableSpace):
    """Units are the blocks' linear layers; a level is a stored variant of the layer's weight.

    Weights are swapped, never overwritten: a dense weight is re-read from the checkpoint (or the
    offload map) when a layer goes dense, and decoded levels live in a byte-bounded LRU on the
    layers' device (``_decoded_budget``: none by default for a model in host RAM). Why the LRU:
    consecutive candidates move a few layers back and forth between the same levels, and decoding
    (unpacking a bitmask, dequantizing) costs several times a copy.
    """

    DECODED_CACHE_BYTES: int | None = None  # None: see _decoded_budget

    def __init__(self, decoder: Decoder, target: float | None, db: str | None):
        if db is None:
            raise UserError(f"the {self.name} space needs --db (build one with: evopress build-db --space "
                            f"{self.name} --out DB)")
        self.decoder = decoder
        self.target = target
        self.db = Database.open(db, self.name, decoder.model)
        self.num_blocks = decoder.num_blocks
        self.units, self.unit_block, self.layers = self.find_units()
        self._variants = VariantCache(self.db)
        self._offload = [offload_hook(m) for m in self.layers]
        self._decoded = ByteLRU(self._decoded_budget())
        self._maps = [hook.weights_map if hook is not None else None for hook in self._offload]
        self._dense = [self._dense_copy(u) for u in range(len(self.units))]
        self._current: list[int | None] = [None] * len(self.units)  # level each layer holds (None: dense)

    def find_units(self) -> tuple[list[str], list[int], list[nn.Module]]:
        """Unit names, their blocks and modules: every block's linear layers, checked against the database; a
        space that compresses other weights too (the gguf space's embeddings) adds them."""
        return linear_units(self.decoder, self.db)

    def _decoded_budget(self) -> int:
        """Bytes of decoded levels to keep: ``DECODED_CACHE_BYTES``, else ``$EVOPRESS_DECODED_CACHE_GB``, else
        1 GiB when the layers are on an accelerator and none when they are in host RAM. Why none there: host
        RAM already holds the model, the database cache and the teacher cache, and on a CPU decoding a
        level costs little next to the forward that follows it."""
        if self.DECODED_CACHE_BYTES is not None:
            return self.DECODED_CACHE_BYTES
        on_host = all(self.device(u).type == "cpu" for u in range(len(self.units)))
        return cache_budget(DECODED_CACHE_ENV, 0.0 if on_host else DEFAULT_DECODED_CACHE_GB)

    def _dense_copy(self, u: int) -> torch.Tensor | None:
        """A host copy of the dense weight, kept only where it cannot be re-read from elsewhere.

        Offloaded layers restore from their weights map and checkpoint-backed layers from the
        memory-mapped checkpoint; only a model built in code (or one whose checkpoint names differ
        from its modules) keeps a copy, which on a CPU model is the weight itself, not a copy.
        """
        layer, checkpoint = self.layers[u], self.decoder.checkpoint
        if self._offload[u] is not None:
            return None
        if checkpoint is not None and checkpoint.matches(f"{self.units[u]}.weight", layer.weight):
            return None
        return layer.weight.data.to("cpu")

    def check_layer_files(self, keys: Callable[[int], list[str]], load: Sequence[str] = ()) -> list[dict]:
        """Refuse a missing or truncated layer file now, not mid-search; returns the tensors in ``load``."""
        return [self.db.check_layer(name, keys(u), load=load) for u, name in enumerate(self.units)]

    def stored(self, u: int, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tensors of unit ``u``'s layer file, through the database's CPU cache."""
        return self._variants.get(self.units[u], keys)

    @abstractmethod
    def decode(self, u: int, level: int) -> torch.Tensor:
        """Unit ``u``'s weight at ``level``, on the layer's device and in its dtype."""

    def weight(self, u: int, level: int) -> torch.Tensor:
        """The layer's weight at a level; the caller must not modify it (it may be cached)."""
        return self._decoded.get((u, level), lambda: self.decode(u, level), tensor_bytes)

    def dense_weight(self, u: int) -> torch.Tensor:
        """The layer's dense weight, on the CPU (read back from wherever it is kept)."""
        if self._dense[u] is not None:
            return self._dense[u]
        if self._maps[u] is not None:
            return self._maps[u]["weight"].to("cpu")
        return self.decoder.checkpoint.get(f"{self.units[u]}.weight", self.layers[u].weight, torch.device("cpu"))

    def device(self, u: int) -> torch.device:
        """Where the layer's levels are kept: its device, or the host for an offloaded layer."""
        return torch.device("cpu") if self._offload[u] is not None else self.layers[u].weight.device

    @torch.no_grad()
    def apply(self, config: Config | None) -> None:
        with long_lived():  # levels stay in their layers across candidates (hostmem)
            self._apply(config)

    def _apply(self, config: Config | None) -> None:
        for u, layer in enumerate(self.layers):
            want = None if config is None else config[u]
            if want == self._current[u]:
                continue
            hook = self._offload[u]
            if hook is not None:  # the offload hook copies its weights map onto the device at each forward
                hook.weights_map = self._maps[u] if want is None else WeightOverride(self._maps[u],
                                                                                      {"weight": self.weight(u, want)})
            else:
                outgoing = layer.weight.data
                layer.weight.data = (to_device(self.dense_weight(u), self.device(u)) if want is None
                                     else self.weight(u, want))
                if self._current[u] is None and self._dense[u] is None:  # a dense weight read from the checkpoint
                    release_file_pages(outgoing)
            self._current[u] = want

    def check_calibration(self, pool: Any) -> None:
        self.db.check_data(pool)

    def level_bits(self, u: int, level: int) -> int:
        """Bits unit ``u``'s weight takes stored at ``level``; a subclass that can say overrides this."""
        raise UserError(f"space '{self.name}' does not say how many bits a stored level takes (level_bits)")

    def size_bytes(self, config: Config) -> int:
        """Every weight at its level's stored size; the rest of the layers (biases) stays dense."""
        weights = sum(m.weight.numel() * m.weight.element_size() for m in self.layers)
        bits = sum(self.level_bits(u, level) for u, level in enumerate(config))
        return self.dense_bytes() - weights + -(-bits // 8)


LayerSolver = Callable[[str, nn.Linear, HessianAccumulator], dict[str, torch.Tensor]]
LayerHook = Callable[[str, nn.Linear, dict[str, torch.Tensor]], None]


def build_layerwise(decoder: Decoder, pool: TokenPool, out: Path, space: str, settings: dict[str, Any],
                    keys: Callable[[str], list[str]], solve: LayerSolver, describe: Callable[[], dict[str, Any]],
                    batch_size: int, progress: bool, after: LayerHook | None = None,
                    select: Callable[[str], bool] = lambda name: True) -> dict[str, Any]:
    """Solve every linear layer block by block and write the database; returns its manifest.

    ``solve(name, layer, hessian)`` returns the tensors of one layer file (``keys(name)`` names the
    ones a finished file must hold); ``after(name, layer, tensors)`` runs once the layer is solved or
    found finished by an interrupted build (e.g. to install a calibration level before the next
    block); ``describe()`` gives the space's own manifest fields once every layer is done.
    ``settings`` are what a resumed build must share with the interrupted one. ``select``: which layers get
    a file (default all; the width space solves only output projections).
    """
    fingerprint = model_fingerprint(decoder.model)  # before a calibration level overwrites weights
    data_fp = data_fingerprint(pool)
    build = BuildLog(out, {"space": space, "model_fingerprint": fingerprint, "data_fingerprint": data_fp,
                           **settings, "dtype": str(decoder.head.weight.dtype)})
    names = [name for name in decoder.linear_layers() if select(name)]
    start = time.perf_counter()

    def compress(b: int, layers: dict[str, nn.Linear], hessians: dict[str, HessianAccumulator]) -> None:
        for name, layer in layers.items():
            if not select(name):
                continue
            tensors = build.done(name, keys(name))  # solved before the build was interrupted
            if tensors is None:
                tensors = solve(name, layer, hessians[name])
                save_layer(out, name, tensors)
            if after is not None:
                after(name, layer, tensors)

    calibrate_blocks(decoder, pool, batch_size, compress, progress)
    manifest = {"space": space, "model_fingerprint": fingerprint, "data": pool.source, "data_fingerprint": data_fp,
                **describe(), "bytes": sum(layer_file(out, name).stat().st_size for name in names),
                "seconds": round(time.perf_counter() - start, 1)}
    build.finish(manifest)
    return manifest
