"""Models larger than a device: blocks offloaded (here to disk, on CPU) search exactly like a resident
model; dense weights are restored from the memory-mapped checkpoint instead of a host copy."""

import json

import pytest
import torch

from evopress.cli import main
from evopress.errors import UserError
from evopress.models import Hardware
from evopress.placement import offload_hook, parse_device_map, parse_max_memory

OFFLOAD = ["--device", "cpu", "--device-map", "auto", "--max-memory", "cpu=30KB"]
SEARCH = ["--generations", "3", "--offspring", "4", "--stages", "2:32,1:64", "--initial-candidates", "3",
          "--initial-tokens", "64", "--final-tokens", "128", "--init-from", "none"]


def test_tiny_max_memory_offloads_the_blocks_and_keeps_the_head(tiny_checkpoint):
    model, _ = tiny_checkpoint
    loaded = Hardware("cpu", device_map="auto", max_memory="cpu=30KB").load(str(model))
    decoder = loaded.decoder
    assert all(offload_hook(layer.self_attn.q_proj) is not None for layer in decoder.layers)
    assert all(layer.self_attn.q_proj.weight.device.type == "meta" for layer in decoder.layers)
    assert decoder.head.weight.device.type == "cpu" and decoder.device == torch.device("cpu")
    resident = Hardware("cpu").load(str(model)).model
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded.model(ids).logits, resident(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("space, build, target", [
    ("drop", None, "0.34"), ("sparsity", ["--levels", "3"], "0.55"), ("quant", ["--bits", "2,3,4"], "2.5"),
    ("width", ["--mlp-step", "32"], "0.4")])
def test_offloaded_search_equals_resident_search(space, build, target, tiny_checkpoint, tmp_path):
    model, text = tiny_checkpoint
    common = ["--model", str(model), "--data", str(text), "--seq-len", "32", "--calib-tokens", "512", "--quiet"]
    extra = []
    if build:
        assert main(["build-db", "--space", space, *build, "--out", str(tmp_path / "db"), *common]) == 0
        extra = ["--db", str(tmp_path / "db")]
    results = []
    for name, placement in (("resident", []), ("offloaded", OFFLOAD)):
        assert main(["search", "--space", space, "--target", target, *extra, *SEARCH, *placement,
                     "--out", str(tmp_path / name), *common]) == 0
        results.append(json.loads((tmp_path / name / "result.json").read_text()))
    resident, offloaded = results
    assert offloaded["levels"] == resident["levels"]
    assert offloaded["fitness"]["kl"] == resident["fitness"]["kl"]
    assert [h["fitness"] for h in offloaded["history"]] == [h["fitness"] for h in resident["history"]]
    assert offloaded["recipe"]["max_memory"] == "cpu=30KB"  # recorded, but not part of the fingerprint


@pytest.mark.parametrize("space, build", [("sparsity", ["--levels", "3"]), ("quant", ["--bits", "2,3"]),
                                          ("width", ["--mlp-step", "32"])])
def test_a_database_built_offloaded_equals_the_resident_build(space, build, tiny_checkpoint, tmp_path):
    """build-db with every block offloaded (one made resident at a time) writes the same levels."""
    from safetensors.torch import load_file

    model, text = tiny_checkpoint
    common = ["--space", space, *build, "--model", str(model), "--data", str(text), "--seq-len", "32",
              "--calib-tokens", "256", "--quiet"]
    assert main(["build-db", *common, "--out", str(tmp_path / "resident")]) == 0
    assert main(["build-db", *common, *OFFLOAD, "--out", str(tmp_path / "offloaded")]) == 0
    files = sorted(p.name for p in (tmp_path / "resident" / "layers").iterdir())
    assert files and files == sorted(p.name for p in (tmp_path / "offloaded" / "layers").iterdir())
    for name in files:
        resident, offloaded = (load_file(str(tmp_path / d / "layers" / name)) for d in ("resident", "offloaded"))
        assert resident.keys() == offloaded.keys()
        assert all(torch.equal(resident[k], offloaded[k]) for k in resident), name
    manifests = [json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("resident", "offloaded")]
    assert [{k: v for k, v in m.items() if k != "seconds"} for m in manifests] == [
        {k: v for k, v in manifests[0].items() if k != "seconds"}] * 2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dense_weights_come_back_from_the_checkpoint_bit_for_bit(dtype, tiny_checkpoint, tmp_path):
    from evopress.data import TokenPool
    from evopress.spaces.quant.build import build_quant_database
    from evopress.spaces.quant.space import QuantSpace

    model, _ = tiny_checkpoint
    pool = TokenPool(torch.randint(0, 50, (8, 16), generator=torch.Generator().manual_seed(1)), "random")
    loaded = Hardware("cpu", dtype).load(str(model))
    dense = {n: m.weight.detach().clone() for n, m in loaded.decoder.linear_layers().items()}
    build_quant_database(Hardware("cpu", dtype).load(str(model)).decoder, pool, tmp_path / "db", (2, 3), 16, 0,
                         batch_size=4, progress=False)
    space = QuantSpace(loaded.decoder, 2.5, db=str(tmp_path / "db"))
    assert all(copy is None for copy in space._dense)  # no host copy: the checkpoint is the dense source
    space.apply((0,) * len(space.units))
    assert not torch.equal(space.layers[0].weight, dense[space.units[0]])
    space.apply(None)
    for name, layer in zip(space.units, space.layers):
        assert layer.weight.dtype == dense[name].dtype and torch.equal(layer.weight, dense[name])
        assert torch.equal(space.dense_weight(space.units.index(name)), dense[name])


def test_placement_settings_are_checked():
    assert parse_max_memory("0=70GiB,cpu=200GiB") == {0: "70GiB", "cpu": "200GiB"}
    assert parse_max_memory('{"cpu": "1GiB"}') == {"cpu": "1GiB"}
    assert parse_device_map("balanced") == "balanced"
    assert parse_device_map('{"model.layers.0": "disk"}') == {"model.layers.0": "disk"}
    for bad in ("70GiB", "", "{}"):
        if bad:
            with pytest.raises(UserError, match="--max-memory"):
                parse_max_memory(bad)
    with pytest.raises(UserError, match="--device-map"):
        parse_device_map("everywhere")


def test_a_database_built_in_bf16_serves_an_fp32_model_and_old_fingerprints_still_load(tiny_checkpoint, tmp_path):
    from evopress.data import TokenPool
    from evopress.database import MANIFEST, model_fingerprints
    from evopress.io import read_json, write_json
    from evopress.spaces.quant.build import build_quant_database
    from evopress.spaces.quant.space import QuantSpace

    model, _ = tiny_checkpoint
    pool = TokenPool(torch.randint(0, 50, (8, 16), generator=torch.Generator().manual_seed(1)), "random")
    build_quant_database(Hardware("cpu", "bfloat16").load(str(model)).decoder, pool, tmp_path / "db", (2, 3), 16, 0,
                         batch_size=4, progress=False)
    fp32 = Hardware("cpu", "float32").load(str(model)).decoder
    assert model_fingerprints(fp32.model)[1] != read_json(tmp_path / "db" / MANIFEST)["model_fingerprint"]
    QuantSpace(fp32, 2.5, db=str(tmp_path / "db"))  # the portable fingerprint matches across dtypes
    manifest = read_json(tmp_path / "db" / MANIFEST)
    write_json(tmp_path / "db" / MANIFEST, {**manifest, "model_fingerprint": model_fingerprints(fp32.model)[1]})
    QuantSpace(fp32, 2.5, db=str(tmp_path / "db"))  # a database from before the portable fingerprint
    write_json(tmp_path / "db" / MANIFEST, {**manifest, "model_fingerprint": "0123456789abcdef"})
    with pytest.raises(UserError, match="built for another model"):
        QuantSpace(fp32, 2.5, db=str(tmp_path / "db"))


def test_a_result_saved_on_a_gpu_machine_evaluates_here_with_device_cpu(tiny_checkpoint, tmp_path):
    from evopress.recipe import make_recipe

    from .test_reliability import search_args

    model, text = tiny_checkpoint
    assert main(search_args(model, text, tmp_path / "run", 1)) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    result["recipe"]["device"] = "cuda:0"  # as written by a search on a GPU
    (tmp_path / "run" / "result.json").write_text(json.dumps(result))
    assert make_recipe(result["recipe"]).device == "cuda:0"  # reading it needs no GPU
    assert main(["eval", str(tmp_path / "run"), "--device", "cpu", "--eval-data", str(text), "--eval-tokens", "64",
                 "--eval-seq-len", "32", "--quiet"]) == 0
    with pytest.raises(UserError, match="unknown device"):
        make_recipe(device="warp-drive")


def test_torchrun_ranks_place_their_replicas_over_disjoint_gpu_shares():
    """N ranks with --device-map on G GPUs: rank r gets GPUs r·G/N ..; indices in the flags count within it."""
    from evopress.distributed import _first_gpu
    from evopress.placement import for_share, gpu_share

    assert [gpu_share(r, 4, 8) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert gpu_share(1, 2, 8) == [4, 5, 6, 7] and gpu_share(0, 1, 2) == [0, 1]
    assert [_first_gpu(r, 4, 8) for r in range(4)] == [0, 2, 4, 6]
    assert [_first_gpu(r, 2, 2) for r in range(2)] == [0, 1] and _first_gpu(2, 3, 8) == 2  # uneven: own index
    for ranks, gpus in ((3, 8), (4, 2)):
        with pytest.raises(UserError, match="cannot split"):
            gpu_share(0, ranks, gpus)
    available = {g: 80 << 30 for g in range(8)} | {"cpu": 500 << 30}
    placed, memory = for_share("auto", parse_max_memory("0=70GiB,1=60GiB,cpu=100GiB"), [2, 3], available)
    assert placed == "auto" and memory == {2: "70GiB", 3: "60GiB", "cpu": "100GiB"}
    assert for_share("balanced", None, [4, 5], available)[1] == {4: 80 << 30, 5: 80 << 30, "cpu": 500 << 30}
    placed, _ = for_share({"model.layers.0": 1, "model.layers.1": "disk", "lm_head": 0}, None, [6, 7], available)
    assert placed == {"model.layers.0": 7, "model.layers.1": "disk", "lm_head": 6}
    with pytest.raises(UserError, match="each rank places its replica over 2 GPU"):
        for_share("auto", parse_max_memory("2=70GiB"), [2, 3], available)


def _checkpoint_rss_kib(path) -> int:
    """Resident KiB of this process's mappings of the file ``path`` (``/proc/self/smaps``)."""
    from pathlib import Path

    target, total, inside = str(Path(path).resolve()), 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if not fields[0].endswith(":"):  # a mapping's header line: range, perms, offset, dev, inode[, path]
            inside = len(fields) >= 6 and fields[5] == target
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


def _whole_pages(t: torch.Tensor) -> int:
    """How many whole pages lie inside a tensor's bytes."""
    import os

    page = os.sysconf("SC_PAGE_SIZE")
    start = t.data_ptr()
    first = -(-start // page)  # index of the first page that starts inside the tensor
    stop = (start + t.numel() * t.element_size()) // page  # one past the last page that ends inside it
    return max(0, stop - first)


def test_released_checkpoint_pages_read_back_the_same_values(tiny_checkpoint):
    """A CPU model views its safetensors file; releasing a weight's pages frees RSS, never changes values.

    Exactly the whole pages inside each weight go: its partial first and last pages are shared with the
    neighbouring tensors, which stay in use. The tiny layers' fp32 weights are 8 KiB (MLP, always more
    than a page), 4 KiB (q, o: a whole page only if page-aligned) and 2 KiB (k, v: never a whole page).
    """
    import os

    from evopress.hostmem import release_file_pages

    assert os.sysconf("SC_PAGE_SIZE") == 4096  # x86-64 Linux; the sizes above assume it
    model, _ = tiny_checkpoint
    loaded = Hardware("cpu").load(str(model))
    named = {n: m.weight for n, m in loaded.decoder.linear_layers().items()}
    before = {n: w.detach().clone() for n, w in named.items()}  # also makes every page resident
    pages = {n: _whole_pages(w) for n, w in named.items()}
    rss = _checkpoint_rss_kib(model / "model.safetensors")
    released = {n for n, w in named.items() if release_file_pages(w.data)}
    freed = rss - _checkpoint_rss_kib(model / "model.safetensors")
    assert released == {n for n, k in pages.items() if k > 0}
    assert {n for n in named if ".mlp." in n} <= released  # measured: the MLP weights, and only they
    assert not {n for n in released if n.endswith(("k_proj", "v_proj"))}
    assert freed == 4 * sum(pages.values()) > 0  # measured 72 KiB: 18 MLP weights of one whole page each
    assert all(torch.equal(w, before[n]) for n, w in named.items())
    anonymous = torch.randn(1 << 16)
    copy = anonymous.clone()
    assert not release_file_pages(anonymous) and torch.equal(anonymous, copy)  # anonymous memory is left alone


def malloc_probe(code: str, *argv: str) -> str:
    """stdout of ``code`` run in a fresh interpreter, with glibc's allocator in its start-up state (no
    ``MALLOC_*`` settings inherited): a process's thresholds cannot be reset once moved."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    return subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.parametrize("mode", ["moving", "fixed"])
def test_large_temporaries_go_back_to_the_os_with_a_fixed_mmap_threshold(mode):
    """A freed 16 MiB temporary stays resident under glibc's moving threshold, and not when it is fixed."""
    probe = ("import sys, torch\n"
             "from evopress.hostmem import map_large_allocations\n"
             "if sys.argv[1] == 'fixed':\n    assert map_large_allocations()\n"
             "def anon():\n"
             "    return int(next(l for l in open('/proc/self/status') if l.startswith('RssAnon')).split()[1])\n"
             "base = anon()\n"
             "for _ in range(3):\n    t = torch.ones(4 << 20)\n    del t\n"
             "print(anon() - base)\n")
    kept_kib = int(malloc_probe(probe, mode).split()[-1])
    assert (kept_kib < 4096) == (mode == "fixed"), kept_kib


def test_long_lived_tensors_get_their_own_mappings_and_temporaries_the_heap():
    """Under the held threshold a 1 MiB temporary comes from the heap (reused without page faults), and
    the same allocation made as long-lived (a level put into a layer) from its own mapping."""
    probe = ("import torch\n"
             "from evopress.hostmem import long_lived, map_large_allocations\n"
             "assert map_large_allocations()\n"
             "def where(t):\n"
             "    a = t.data_ptr()\n"
             "    for line in open('/proc/self/maps'):\n"
             "        lo, hi = (int(x, 16) for x in line.split()[0].split('-'))\n"
             "        if lo <= a < hi:\n"
             "            return 'heap' if line.rstrip().endswith('[heap]') else 'own'\n"
             "temporary = torch.ones(1 << 18)\n"
             "with long_lived():\n    kept = torch.ones(1 << 18)\n"
             "after = torch.ones(1 << 18)\n"
             "print(where(temporary), where(kept), where(after))\n")
    assert malloc_probe(probe).split() == ["heap", "own", "heap"]


def test_a_users_malloc_setting_is_left_alone(monkeypatch):
    from evopress.hostmem import map_large_allocations

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert map_large_allocations() is False


def test_a_host_tensor_reaches_a_gpu_through_pinned_memory_without_the_host_waiting(monkeypatch):
    """On CUDA a level is staged in pinned memory and copied with non_blocking (a pageable copy would
    make the host wait for the device's queue); simulated here by recording the calls."""
    from evopress.placement import to_device

    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: calls.append(("to", a, k)) or self)
    t = torch.ones(3)
    assert to_device(t, torch.device("cuda", 0)) is t
    assert calls == ["pin", ("to", (torch.device("cuda", 0),), {"non_blocking": True})]
    calls.clear()
    assert to_device(t, torch.device("cpu")) is t and calls == []  # already there: no copy at all


@pytest.mark.parametrize("space_name", ["quant", "sparsity"])
def test_every_level_and_dense_restore_goes_through_the_non_blocking_copy(space_name, monkeypatch, tmp_path):
    """``apply`` moves stored levels and dense weights to the layers' device only by ``to_device``."""
    import importlib

    from evopress.models import Decoder
    from evopress.placement import to_device

    from .conftest import tiny_model, tiny_quant_database, tiny_sparsity_database

    if space_name == "quant":
        from evopress.spaces.quant.space import QuantSpace

        model, _, _, root, _ = tiny_quant_database(tmp_path, 2, (2, 3))
        space = QuantSpace(Decoder(model), 2.5, db=str(root))
        per_level = 3  # packed codes, scales, zero points
    else:
        from evopress.data import TokenPool
        from evopress.spaces.sparsity.space import SparsitySpace

        model = tiny_model(layers=2)
        pool = TokenPool(torch.randint(0, 97, (12, 16), generator=torch.Generator().manual_seed(1)), "random")
        tiny_sparsity_database(tmp_path, model, pool)
        space = SparsitySpace(Decoder(model), 0.5, db=str(tmp_path))
        per_level = 2  # bit mask, kept values
    seen = []

    def recording(tensor, device):
        seen.append(device)
        return to_device(tensor, device)

    for module in (f"evopress.spaces.{space_name}.space", "evopress.spaces.layerwise"):
        monkeypatch.setattr(importlib.import_module(module), "to_device", recording)
    space.apply((0,) * len(space.units))
    assert len(seen) == per_level * len(space.units)
    space.apply(None)
    assert len(seen) == (per_level + 1) * len(space.units)


def test_an_offloaded_finalize_equals_the_resident_one(tiny_checkpoint, tmp_path):
    """finalize with every block offloaded (one resident at a time, as build-db) re-solves the same levels."""
    from safetensors.torch import load_file

    model, text = tiny_checkpoint
    common = ["--model", str(model), "--data", str(text), "--seq-len", "32", "--calib-tokens", "256", "--quiet"]
    assert main(["build-db", "--space", "quant", "--bits", "2,3", "--out", str(tmp_path / "db"), *common]) == 0
    assert main(["baseline", "--space", "quant", "--method", "dp", "--target", "2.5", "--db", str(tmp_path / "db"),
                 "--tokens", "64", "--final-tokens", "128", "--out", str(tmp_path / "dp"), *common]) == 0
    for name, placement in (("resident", []), ("offloaded", OFFLOAD)):
        assert main(["finalize", str(tmp_path / "dp"), "--calib-tokens", "256", *placement, "--quiet",
                     "--out", str(tmp_path / name)]) == 0
    files = sorted(p.name for p in (tmp_path / "resident" / "db" / "layers").iterdir())
    assert files and files == sorted(p.name for p in (tmp_path / "offloaded" / "db" / "layers").iterdir())
    for name in files:
        resident, offloaded = (load_file(str(tmp_path / d / "db" / "layers" / name)) for d in ("resident", "offloaded"))
        assert resident.keys() == offloaded.keys() and all(torch.equal(resident[k], offloaded[k]) for k in resident)
    results = [json.loads((tmp_path / d / "result.json").read_text()) for d in ("resident", "offloaded")]
    assert results[0]["fitness"]["kl"] == results[1]["fitness"]["kl"]
