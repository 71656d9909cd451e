"""Where a model's weights live: one device, several, or offloaded to CPU RAM / disk, and how to read or
replace a weight wherever it is.

Why this is its own concern: a 70B model fits on no single accelerator and its host holds one copy of
the weights at most. Models are loaded straight onto their devices from memory-mapped safetensors
(no full host copy). Larger ones are placed by accelerate's device maps: decoder blocks spread over
the GPUs and, past ``max_memory``, offloaded to CPU RAM or to disk (read back from the checkpoint's own
safetensors files, block by block, at each forward). The embeddings, final norm and LM head always
stay on the main device, because the fitness reads the head's weight directly and every candidate
enters and leaves the block stack there. Block-boundary tensors move between devices as blocks
demand (accelerate's hooks move each block's inputs to its execution device).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors import safe_open
from torch import nn

from .errors import UserError

AUTO_MAPS = ("auto", "balanced")


def offload_hook(module: nn.Module) -> Any | None:
    """accelerate's hook that reloads ``module``'s weights at every forward, if it is offloaded."""
    hook = getattr(module, "_hf_hook", None)
    return hook if getattr(hook, "offload", False) else None


def execution_device(module: nn.Module) -> torch.device:
    """The device a module computes on (its weights may be kept elsewhere, e.g. offloaded to disk)."""
    hook = getattr(module, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        dev = hook.execution_device
        return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def named_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``model.named_parameters()`` with offloaded ones read back (cast as the hook casts them at forward)."""
    for module_name, module in model.named_modules():
        hook = offload_hook(module)
        for name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if param.device.type == "meta" and hook is not None:
                yield full, hook.weights_map[name].to(param.dtype)
            else:
                yield full, param


@contextmanager
def resident(module: nn.Module) -> Iterator[None]:
    """``module``'s offloaded weights on their execution device for a while, its offload hooks paused.

    Why: building a database reads and rewrites a block's weights between forwards (Hessians live on
    the weight's device, solvers read the weight, a calibration level is installed before the next
    block's inputs are computed), and an offloaded layer holds only meta tensors between forwards.
    A build makes one block resident at a time, so it needs one block's memory beyond the placement.
    Nothing it does to the weights outlives the block: they go back to the meta device on exit.
    """
    from accelerate.utils import set_module_tensor_to_device

    paused = []
    try:
        for m in module.modules():
            hook = offload_hook(m)
            if hook is None:
                continue
            names = [n for n, p in m.named_parameters(recurse=False) if p.device.type == "meta"]
            for n in names:  # cast to the model's dtype, as the hook casts at every forward
                set_module_tensor_to_device(m, n, hook.execution_device, value=hook.weights_map[n])
            hook.offload = False
            paused.append((m, hook, names))
        yield
    finally:
        for m, hook, names in paused:
            for n in names:
                set_module_tensor_to_device(m, n, "meta")
            hook.offload = True


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``, copied without making the host wait for the device's queue.

    Why: a copy from pageable host memory to a GPU returns only once the copy is done, so a level put
    into a layer for each candidate would drain the queue of kernels the fitness keeps full (no host
    syncs per candidate: ``fitness``). A copy from pinned memory is asynchronous; the staging block
    comes from torch's caching host allocator, which does not reuse it before its copy has run.
    A tensor already on ``device`` is returned as it is.
    """
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class WeightOverride(Mapping[str, torch.Tensor]):
    """An offloaded module's weights map with some tensors replaced (a compressed level).

    accelerate's offload hook copies ``weights_map[name]`` onto the execution device before every
    forward, so replacing the map entry is how a level is put into an offloaded layer; restoring the
    original map restores the dense weight straight from the checkpoint, with no copy kept anywhere.
    """

    def __init__(self, base: Mapping[str, torch.Tensor], replaced: dict[str, torch.Tensor]):
        self.base, self.replaced = base, replaced

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.replaced[key] if key in self.replaced else self.base[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.base.keys())

    def __len__(self) -> int:
        return len(self.base.keys())

    def keys(self):  # accelerate asks the base map's keys() (full names, for int8 statistics)
        return self.base.keys()


class CheckpointReader:
    """Tensors of a safetensors checkpoint, read memory-mapped one at a time.

    Lets a space restore a layer's dense weight from disk instead of keeping a host copy of every
    compressible weight (137 GB for a 70B model).
    """

    def __init__(self, files: dict[str, Path]):
        self.files = files

    @classmethod
    def open(cls, root: Path) -> "CheckpointReader | None":
        root = Path(root)
        index = root / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            return cls({key: root / name for key, name in weight_map.items()})
        single = root / "model.safetensors"
        if single.is_file():
            with safe_open(str(single), framework="pt") as f:
                return cls({key: single for key in f.keys()})
        return None

    def get(self, key: str, like: torch.Tensor, device: torch.device) -> torch.Tensor | None:
        """Tensor ``key`` cast as ``from_pretrained`` casts it (to ``like``'s dtype), or None if absent."""
        if key not in self.files:
            return None
        with safe_open(str(self.files[key]), framework="pt") as f:
            return f.get_tensor(key).to(device=device, dtype=like.dtype)

    def matches(self, key: str, weight: torch.Tensor) -> bool:
        """Whether ``key`` holds ``weight`` (its first row, read without loading the rest)."""
        if key not in self.files or weight.device.type == "meta":
            return False
        with safe_open(str(self.files[key]), framework="pt") as f:
            part = f.get_slice(key)
            if tuple(part.get_shape()) != tuple(weight.shape):
                return False
            row = part[0:1].to(dtype=weight.dtype)
        return torch.equal(row, weight[0:1].detach().cpu())


def parse_max_memory(text: str | None) -> dict[Any, str | int] | None:
    """``"0=70GiB,1=70GiB,cpu=200GiB"`` (or the same as JSON) -> accelerate's max_memory mapping."""
    if not text:
        return None
    try:
        raw = json.loads(text) if text.lstrip().startswith("{") else dict(p.split("=", 1) for p in text.split(","))
    except ValueError:
        raw = None
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"--max-memory '{text}' must look like '0=70GiB,cpu=200GiB' (device=size, ...)")
    return {int(k) if str(k).strip().isdigit() else str(k).strip(): _memory_size(k, v) for k, v in raw.items()}


def _memory_size(device: Any, value: Any) -> str | int:
    """A size as accelerate reads it (bytes as an int, or a number with a unit), refused now if it cannot
    be read: accelerate would refuse it only once the model loads."""
    from accelerate.utils import convert_file_size_to_int

    text = str(value).strip()
    if text.isdigit():
        return int(text)
    try:
        convert_file_size_to_int(text)
    except ValueError:
        raise UserError(f"--max-memory {str(device).strip()}={text}: a size is a number of bytes or a positive "
                        "number with a unit, e.g. 70GiB or 500MB") from None
    return text


def parse_device_map(text: str | None) -> str | dict[str, Any] | None:
    """``auto``, ``balanced``, a JSON object {module: device}, or a path to a JSON file holding one."""
    if not text:
        return None
    if text in AUTO_MAPS:
        return text
    source = Path(text).read_text() if Path(text).is_file() else text
    try:
        mapping = json.loads(source)
    except json.JSONDecodeError:
        mapping = None
    if not isinstance(mapping, dict):
        raise UserError(f"--device-map '{text}': use auto, balanced, or a JSON object {{module: device}}")
    return mapping


def gpu_share(local_rank: int, local_world: int, gpus: int) -> list[int]:
    """The GPUs a torchrun rank places its model replica over: an equal, contiguous share of the node's.

    With N ranks per node on G visible GPUs, rank r gets GPUs r·G/N .. (r+1)·G/N - 1, so replicas never
    share a device; G must be a multiple of N (an idle or shared GPU would be a silent waste).
    """
    if gpus < local_world or gpus % local_world:
        raise UserError(f"--device-map under torchrun: {local_world} ranks per node cannot split {gpus} visible "
                        "GPU(s) evenly; start a number of ranks that divides the GPUs (each rank places its "
                        "replica over its own share)")
    share = gpus // local_world
    return list(range(local_rank * share, (local_rank + 1) * share))


def torchrun_share() -> list[int] | None:
    """This rank's ``gpu_share`` when torchrun started several CUDA processes, else None (all GPUs visible)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not torch.cuda.is_available():
        return None
    return gpu_share(int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
                     torch.cuda.device_count())


def for_share(device_map: str | dict[str, Any], max_memory: dict[Any, str | int] | None, share: list[int],
              available: dict[Any, Any]) -> tuple[str | dict[str, Any], dict[Any, Any]]:
    """A rank's placement: GPU indices in ``device_map`` and ``max_memory`` count within its ``share``.

    ``--max-memory 0=70GiB,1=70GiB`` describes one replica, so every rank reads it as its own first and
    second GPU; without ``--max-memory`` a rank may fill its own GPUs (``available``, accelerate's
    ``get_max_memory()``) and CPU RAM, never another rank's GPUs.
    """
    def gpu(index: Any) -> Any:
        if not isinstance(index, int):
            return index
        if not 0 <= index < len(share):
            raise UserError(f"--device-map/--max-memory name GPU {index}, but each rank places its replica over "
                            f"{len(share)} GPU(s) (numbered from 0 within the rank's share)")
        return share[index]

    if max_memory is None:
        max_memory = {**{i: available[g] for i, g in enumerate(share)}, "cpu": available["cpu"]}
    placed = {k: gpu(v) for k, v in device_map.items()} if isinstance(device_map, dict) else device_map
    return placed, {gpu(k): v for k, v in max_memory.items()}


def device_map_for(empty: nn.Module, blocks_prefix: str, num_blocks: int, main: torch.device,
                   device_map: str | dict[str, Any], max_memory: dict[Any, str | int] | None,
                   dtype: torch.dtype) -> dict[str, Any]:
    """Blocks spread by ``device_map`` (over GPUs, CPU RAM, disk); everything else on ``main``."""
    if isinstance(device_map, dict):
        placed = dict(device_map)
    else:
        from accelerate import infer_auto_device_map
        from accelerate.utils import get_balanced_memory

        no_split = list(getattr(empty, "_no_split_modules", None) or [])
        no_split.append(type(empty.get_submodule(blocks_prefix)[0]).__name__)  # a block is never split
        if device_map == "balanced":
            max_memory = get_balanced_memory(empty, max_memory=max_memory, no_split_module_classes=no_split,
                                             dtype=dtype)
        placed = infer_auto_device_map(empty, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    home = main.index if main.type == "cuda" and main.index is not None else main.type
    out = {name: home for name in _outside(empty, blocks_prefix)}
    for b in range(num_blocks):
        name = f"{blocks_prefix}.{b}"
        owner = next((k for k in (name, blocks_prefix, "") if k in placed), None)
        out[name] = placed[owner] if owner is not None else home
    return out


def _outside(module: nn.Module, blocks_prefix: str, prefix: str = "") -> list[str]:
    """Names of the modules that together hold everything except the decoder blocks."""
    names = []
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if full == blocks_prefix:
            continue
        if blocks_prefix.startswith(full + "."):
            names += _outside(child, blocks_prefix, full + ".")
        else:
            names.append(full)
    return names
