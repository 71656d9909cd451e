"""Level databases: per-layer compressed variants, built once and reused for any budget.

Layout of a database directory::

    manifest.json          what was built, from which model and data (fingerprints), levels, sizes
    layers/<module>.safetensors   every level of one linear layer, in a compact space-specific form

The manifest is written last, so a directory without one is an interrupted build, never a silently
partial database. Building is block-sequential (the standard GPTQ/SparseGPT scheme): the inputs of
block b are the outputs of blocks 0..b-1; each layer's Hessian comes from those inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .compressors.hessian import HessianAccumulator
from .data import TokenPool
from .errors import UserError
from .io import atomic_write, read_json, write_json
from .models import Decoder
from .placement import named_parameters, resident

MANIFEST = "manifest.json"
BUILD = "build.json"  # settings of a build in progress (see BuildLog)
FORMAT = "evopress-db/1"
CACHE_ENV = "EVOPRESS_DB_CACHE_GB"
DEFAULT_CACHE_GB = 8.0
DECODED_CACHE_ENV = "EVOPRESS_DECODED_CACHE_GB"  # decoded levels, on the layers' device (see LayerwiseSpace)
DEFAULT_DECODED_CACHE_GB = 1.0


def model_fingerprints(model: nn.Module) -> tuple[str, str]:
    """(portable, exact) fingerprints: config plus a strided sample of every parameter.

    Cheap even at 70B, and changes with the weights. The portable one rounds the samples to bfloat16
    first, so one checkpoint loaded in fp32 or bf16 gets the same fingerprint and a database built on
    a GPU in bf16 serves an fp32 run on a CPU. The exact one (unrounded samples) is what databases
    built before that change recorded; it is still accepted.
    """
    portable, exact = hashlib.sha256(b"bf16-samples"), hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        # metadata that loading or save_pretrained rewrites (``architectures``) is not the model
        meta = ("dtype", "torch_dtype", "_name_or_path", "transformers_version", "architectures")
        d = json.dumps({k: v for k, v in config.to_dict().items() if k not in meta}, sort_keys=True, default=str)
        portable.update(d.encode())
        exact.update(d.encode())
    for name, p in named_parameters(model):  # offloaded weights are read back from their map
        flat = p.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // 256)][:256].cpu()
        for h, values in ((portable, sample.to(torch.bfloat16).float()), (exact, sample.float())):
            h.update(name.encode() + str(tuple(p.shape)).encode())
            h.update(values.numpy().tobytes())
    return portable.hexdigest()[:16], exact.hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> str:
    return model_fingerprints(model)[0]


def windows_fingerprint(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.contiguous().numpy().tobytes()).hexdigest()[:16]


def data_fingerprint(pool: TokenPool) -> str:
    return windows_fingerprint(pool.windows)


def value_dtype(dtype: torch.dtype) -> torch.dtype:
    """How a database stores weight values: fp16 for fp32/fp16 models (as the paper's database), bf16 for
    bf16 ones (fp16 cannot hold their range)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float16


def layer_file(root: Path, name: str) -> Path:
    return Path(root) / "layers" / f"{name}.safetensors"


def save_layer(root: Path, name: str, tensors: dict[str, torch.Tensor]) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(layer_file(root, name), lambda tmp: save_file(tensors, str(tmp)))


@dataclass
class Database:
    """An opened, verified database: its manifest and lazy access to layer files.

    ``base``: for an overlay (a finalized profile's re-solved levels, ``spaces/finalize.py``), the
    database its layer files add to; a tensor the overlay does not hold is read from there.
    """

    root: Path
    manifest: dict[str, Any]
    base: "Database | None" = None

    @staticmethod
    def open(root: str | Path, space: str, model: nn.Module) -> "Database":
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            hint = " (interrupted build? rerun build-db)" if (root / "layers").is_dir() else ""
            raise UserError(f"no database at {root}{hint}")
        manifest = read_json(path)
        if manifest.get("format") != FORMAT:
            raise UserError(f"{path} is not an evopress database ({FORMAT})")
        if manifest.get("space") != space:
            raise UserError(f"database {root} was built for space '{manifest.get('space')}', not '{space}'")
        fps = model_fingerprints(model)
        if manifest.get("model_fingerprint") not in fps:
            raise UserError(f"database {root} was built for another model (fingerprint "
                            f"{manifest.get('model_fingerprint')} != {fps[0]})")
        overlay = manifest.get("finalized")
        base = Database.open(overlay["base"], space, model) if overlay else None
        return Database(root, manifest, base)

    def check_data(self, pool: TokenPool) -> None:
        """Refuse a search whose calibration text differs from the text the database was built on.

        The name must match, and so must the content where it can be compared: a pool is a prefix of a
        larger pool of the same text (one seeded draw of windows), so when the search's windows have
        the database's length and there are at least as many, the database's windows are the first
        of them. A file edited since the build, or a database from before the current tokenization,
        is caught; mixes (``a+b``) are compared by name only.
        """
        if self.manifest.get("data") != pool.source:
            raise UserError(f"database {self.root} was built on data '{self.manifest.get('data')}', "
                            f"the search uses '{pool.source}'; rebuild it or pass the same --data")
        calibration = self.manifest.get("calibration", {})
        seq_len, tokens = calibration.get("seq_len"), calibration.get("tokens", 0)
        n = tokens // seq_len if seq_len else 0
        if "+" in pool.source or seq_len != pool.seq_len or not 0 < n <= len(pool.windows):
            return
        if windows_fingerprint(pool.windows[:n]) != self.manifest.get("data_fingerprint"):
            raise UserError(f"database {self.root} was built on other text than the search's '{pool.source}' "
                            "(the file changed since, or the database predates the current tokenization); "
                            "rebuild it")

    def check_layer(self, name: str, keys: Sequence[str], load: Sequence[str] = ()) -> dict[str, torch.Tensor]:
        """Refuse a missing, truncated or incomplete layer file now rather than mid-search; return ``load``.

        Reads the header (safetensors checks it against the file size on open) and only the tensors
        named in ``load``.
        """
        path = layer_file(self.root, name)
        if self.base is not None and not path.is_file():
            return self.base.check_layer(name, keys, load)
        try:
            with safe_open(str(path), framework="pt") as f:
                own = set(f.keys())
                missing = (set(keys) | set(load)) - own
                found = {k: f.get_tensor(k) for k in load if k in own}
        except (SafetensorError, OSError) as e:
            raise _corrupt(path, e) from e
        if not missing:
            return found
        if self.base is not None:
            return {**found, **self.base.check_layer(name, [k for k in keys if k not in own],
                                                     [k for k in load if k not in own])}
        raise UserError(f"database layer file for {name} lacks {sorted(missing)}; rebuild the database")

    def read(self, name: str, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Some tensors of one layer file, without reading the rest of it."""
        return self.check_layer(name, (), load=keys)


def _corrupt(path: Path, e: Exception) -> UserError:
    return UserError(f"database layer file {path} is missing or corrupt ({e}); rebuild the database")


class ByteLRU:
    """Least-recently-used values up to a byte budget; a value larger than the budget is not kept."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Any, make: Callable[[], Any], size: Callable[[Any], int]) -> Any:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key][0]
        value = make()
        n = size(value)
        while self._items and self.bytes + n > self.max_bytes:
            _, (_, old) = self._items.popitem(last=False)
            self.bytes -= old
        if n <= self.max_bytes:
            self._items[key] = (value, n)
            self.bytes += n
        return value


def tensor_bytes(tensors: torch.Tensor | dict[str, torch.Tensor]) -> int:
    values = tensors.values() if isinstance(tensors, dict) else [tensors]
    return sum(t.numel() * t.element_size() for t in values)


class VariantCache:
    """Compressed layer variants read from a database on demand, kept in CPU RAM up to a byte budget.

    Why: a database is several times its model (all levels of a 70B model's quant database are 240 GB),
    so it can live neither on the accelerator nor always in RAM. A search keeps revisiting the levels
    near its parent, which a least-recently-used cache keeps hot; a small model's database fits whole
    and is read once. Budget: ``$EVOPRESS_DB_CACHE_GB`` (default 8); variants move to the model's
    device only when applied.
    """

    def __init__(self, db: Database, max_bytes: int | None = None):
        self.db = db
        self._lru = ByteLRU(cache_budget() if max_bytes is None else max_bytes)

    @property
    def bytes(self) -> int:
        return self._lru.bytes

    def get(self, name: str, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        return self._lru.get((name, tuple(keys)), lambda: self.db.read(name, keys), tensor_bytes)


def cache_budget(env: str = CACHE_ENV, default_gb: float = DEFAULT_CACHE_GB) -> int:
    raw = os.environ.get(env, str(default_gb))
    try:
        gb = float(raw)
    except ValueError:
        raise UserError(f"{env}={raw!r} is not a number of GiB") from None
    if gb < 0:
        raise UserError(f"{env}={raw!r} must be >= 0")
    return int(gb * 2**30)


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    write_json(Path(root) / MANIFEST, {"format": FORMAT, **manifest})


class BuildLog:
    """Lets a killed ``build-db`` resume: layers a rerun with the same settings need not solve again.

    Why: a 70B database takes hours. Layer files are written atomically, so any that exists is whole;
    ``build.json`` records the settings they were made with (fingerprints and parameters); the
    manifest comes last. A finished database is never overwritten: that would destroy hours of work
    for a mistyped ``--out``.
    """

    def __init__(self, root: Path, settings: dict[str, Any]):
        self.root = Path(root)
        if (self.root / MANIFEST).is_file():
            raise UserError(f"{self.root} already holds a finished database; delete it or choose another --out")
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in (self.root / "layers").glob(".*.tmp"):  # a write cut short by SIGKILL
            stale.unlink()
        path = self.root / BUILD
        settings = json.loads(json.dumps(settings))  # as it reads back
        self.resuming = path.is_file() and read_json(path) == settings
        if not self.resuming:
            write_json(path, settings)

    def done(self, name: str, keys: Sequence[str]) -> dict[str, torch.Tensor] | None:
        """The stored tensors of a layer this build already finished, else None."""
        path = layer_file(self.root, name)
        if not self.resuming or not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError):
            return None
        return tensors if set(keys) <= set(tensors) else None

    def finish(self, manifest: dict[str, Any]) -> None:
        write_manifest(self.root, manifest)
        (self.root / BUILD).unlink(missing_ok=True)


def block_linears(decoder: Decoder, b: int) -> dict[str, nn.Linear]:
    prefix = next(n for n, m in decoder.model.named_modules() if m is decoder.layers)
    return {f"{prefix}.{b}.{n}": m for n, m in decoder.layers[b].named_modules() if isinstance(m, nn.Linear)}


def linear_units(decoder: Decoder, db: Database) -> tuple[list[str], list[int], list[nn.Linear]]:
    """The per-layer spaces' units: every block's linear layers in block order, checked against ``db``.

    Returns module names, the block of each and the modules themselves.
    """
    names, blocks, layers = [], [], []
    for b in range(decoder.num_blocks):
        for name, module in block_linears(decoder, b).items():
            names.append(name)
            blocks.append(b)
            layers.append(module)
    if sorted(names) != sorted(db.manifest["layers"]):
        raise UserError(f"database {db.root} holds other layers than this model's linear layers")
    return names, blocks, layers


@contextmanager
def single_thread() -> Iterator[None]:
    """Run per-layer solvers on one intra-op thread.

    SparseGPT/GPTQ column loops are thousands of small ops on one column at a time; extra threads
    only add barriers between them (measured in docs/speed.md).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


CompressBlock = Callable[[int, dict[str, nn.Linear], dict[str, HessianAccumulator]], None]


@torch.inference_mode()
def calibrate_blocks(decoder: Decoder, pool: TokenPool, batch_size: int, compress: CompressBlock,
                     progress: bool = True, true_sequential: bool = False, desc: str = "database"
                     ) -> list[torch.Tensor]:
    """Block by block: accumulate every linear layer's input Hessian, call ``compress``, move on.

    ``compress(b, layers, hessians)`` may change the block's weights (e.g. install a calibration-level
    variant); the next block's inputs are computed after it returns, with whatever weights it left.
    ``true_sequential``: within a block too, one group of layers at a time (``_input_groups``), each
    group's Hessians taken after the groups before it were compressed. Activations of the whole
    calibration set are held in memory once (tokens x hidden). Returns the residual stream after the
    last block, per batch (what the LM head's input statistics come from).
    """
    from tqdm.auto import tqdm

    batches = [pool.windows[s: s + batch_size] for s in range(0, len(pool.windows), batch_size)]
    inputs = [decoder.enter(ids) for ids in batches]
    states = [inp.hidden for inp in inputs]
    for b in tqdm(range(decoder.num_blocks), desc=desc, unit="block", disable=not progress):
        with resident(decoder.layers[b]):  # an offloaded block's weights, for this block's work only
            layers = block_linears(decoder, b)
            groups = _input_groups(decoder, b, states[0], inputs[0], layers) if true_sequential else [list(layers)]
            for group in groups:
                _calibrate_group(decoder, b, states, inputs, {n: layers[n] for n in group}, compress)
            states = [decoder.run_block(b, h, inp) for h, inp in zip(states, inputs)]
    return states


def _calibrate_group(decoder: Decoder, b: int, states: list[torch.Tensor], inputs: list[Any],
                     layers: dict[str, nn.Linear], compress: CompressBlock) -> None:
    """The Hessians of ``layers`` (of block ``b``) over every batch, then ``compress``."""
    hessians = {n: HessianAccumulator(m.in_features, device=m.weight.device) for n, m in layers.items()}
    hooks = [m.register_forward_pre_hook(lambda mod, args, acc=hessians[n]: acc.add(args[0]))
             for n, m in layers.items()]
    try:
        for h, inp in zip(states, inputs):
            decoder.run_block(b, h, inp)
    finally:
        for hook in hooks:
            hook.remove()
    compress(b, layers, hessians)


def _input_groups(decoder: Decoder, b: int, hidden: torch.Tensor, inputs: Any,
                  layers: dict[str, nn.Linear]) -> list[list[str]]:
    """The block's layers in the order they run, consecutive layers that read the same tensor grouped
    (Llama: q/k/v, o, gate/up, down): each group's inputs depend only on the groups before it.

    The inputs are held until the end of the forward, so no two are ever the same tensor by a freed
    address being reused: ``is`` tells exactly which layers share one."""
    calls: list[tuple[str, torch.Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: calls.append((n, args[0])))
             for n, m in layers.items()]
    try:
        decoder.run_block(b, hidden, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    groups: list[list[str]] = []
    seen: set[str] = set()
    for i, (name, x) in enumerate(calls):
        if name in seen:
            continue
        if i and x is calls[i - 1][1] and groups:
            groups[-1].append(name)
        else:
            groups.append([name])
        seen.add(name)
    return groups + [[n] for n in layers if n not in seen]  # a layer the block did not run (a dropped sub-block)
