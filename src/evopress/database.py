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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .compressors.hessian import HessianAccumulator
from .data import TokenPool
from .errors import UserError
from .io import atomic_write, read_json, write_json
from .models import Decoder

MANIFEST = "manifest.json"
FORMAT = "evopress-db/1"


def model_fingerprint(model: nn.Module) -> str:
    """Config plus a strided sample of every parameter: cheap even at 70B, and changes with the weights."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        # metadata that loading or save_pretrained rewrites (``architectures``) is not the model
        meta = ("dtype", "torch_dtype", "_name_or_path", "transformers_version", "architectures")
        d = {k: v for k, v in config.to_dict().items() if k not in meta}
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 256)
        h.update(name.encode() + str(tuple(p.shape)).encode())
        h.update(flat[::step][:256].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def data_fingerprint(pool: TokenPool) -> str:
    return hashlib.sha256(pool.windows.numpy().tobytes()).hexdigest()[:16]


def layer_file(root: Path, name: str) -> Path:
    return Path(root) / "layers" / f"{name}.safetensors"


def save_layer(root: Path, name: str, tensors: dict[str, torch.Tensor]) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(layer_file(root, name), lambda tmp: save_file(tensors, str(tmp)))


@dataclass
class Database:
    """An opened, verified database: its manifest and lazy access to layer files."""

    root: Path
    manifest: dict[str, Any]

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
        fp = model_fingerprint(model)
        if manifest.get("model_fingerprint") != fp:
            raise UserError(f"database {root} was built for another model ({manifest.get('model')}, "
                            f"fingerprint {manifest.get('model_fingerprint')} != {fp})")
        return Database(root, manifest)

    def check_data(self, pool: TokenPool) -> None:
        """Refuse a search whose calibration text differs from the text the database was built on."""
        if self.manifest.get("data") != pool.source:
            raise UserError(f"database {self.root} was built on data '{self.manifest.get('data')}', "
                            f"the search uses '{pool.source}'; rebuild it or pass the same --data")

    def load_layer(self, name: str) -> dict[str, torch.Tensor]:
        path = layer_file(self.root, name)
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise UserError(f"database layer file {path} is missing or corrupt ({e}); rebuild the database") from e


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    write_json(Path(root) / MANIFEST, {"format": FORMAT, **manifest})


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

    SparseGPT/GPTQ column loops are thousands of small ops; extra threads only add barriers. On a
    shared 2-core CPU one SparseGPT level of a 576x1536 layer took 0.46 s with one thread, 2.2 s with two.
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
                     progress: bool = True) -> None:
    """Block by block: accumulate every linear layer's input Hessian, call ``compress``, move on.

    ``compress(b, layers, hessians)`` may change the block's weights (e.g. install a calibration-level
    variant); the next block's inputs are computed after it returns, with whatever weights it left.
    Activations of the whole calibration set are held in memory once (tokens x hidden).
    """
    from tqdm.auto import tqdm

    batches = [pool.windows[s: s + batch_size] for s in range(0, len(pool.windows), batch_size)]
    inputs = [decoder.enter(ids) for ids in batches]
    states = [inp.hidden for inp in inputs]
    for b in tqdm(range(decoder.num_blocks), desc="database", unit="block", disable=not progress):
        layers = block_linears(decoder, b)
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
        states = [decoder.run_block(b, h, inp) for h, inp in zip(states, inputs)]
