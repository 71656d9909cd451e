"""Sparsity space: level arithmetic, compact database, exact budgets, OWL, export."""

import json
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from evopress.compressors.sparsegpt import sparsegpt_prune_levels
from evopress.data import TokenPool
from evopress.database import CACHE_ENV, calibrate_blocks, layer_file, single_thread
from evopress.errors import UserError
from evopress.evolution import mutate
from evopress.fitness import Evaluator
from evopress.models import Decoder
from evopress.spaces.plugin import BaselineInputs
from evopress.spaces.sparsity.baselines import owl, owl_configs, owl_sparsities, uniform
from evopress.spaces.sparsity.bitmask import export_bitmask
from evopress.spaces.sparsity.export import PROFILE, export
from evopress.spaces.sparsity.levels import default_step, level_grid, nearest_levels, sparsity_problem
from evopress.spaces.sparsity.space import SparsitySpace
from evopress.spaces.sparsity.storage import decode_level, encode_level

from .conftest import assert_prefix_reuse_matches_full_forward, logits_under, tiny_model, tiny_sparsity_database

STEP = 24  # tiny layers: 512 (k/v), 1024 (q/o), 2048 (MLP) weights


def _pool() -> TokenPool:
    return TokenPool(torch.randint(0, 97, (12, 16), generator=torch.Generator().manual_seed(1)), "random")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A 3-block tiny Llama, its dense weights, and a SparseGPT database centred at 50%, ±4 levels."""
    model = tiny_model(layers=3)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    root = tmp_path_factory.mktemp("sdb")
    return model, dense, root, tiny_sparsity_database(root, model, _pool(), STEP)


def space_for(built, target, **options):
    model, dense, root, _ = built
    model.load_state_dict(dense)
    return SparsitySpace(Decoder(model), target, db=str(root), **options)


# --- level arithmetic ----------------------------------------------------------------------------


def test_level_grid_and_default_step():
    first, zeros = level_grid(1000, 0.5, 100, 8)
    assert (first, zeros) == (-5, [0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000])
    first, zeros = level_grid(110_592, 0.7, 27_648, 3)  # GQA k/v at 70%: only levels inside [0, numel]
    assert first == -2 and all(b - a == 27_648 for a, b in zip(zeros, zeros[1:])) and zeros[-1] <= 110_592
    smollm = [331_776, 110_592, 110_592, 331_776, 884_736, 884_736, 884_736]
    assert default_step(smollm) == 17_694  # largest / 50 (2% of an MLP layer); k/v move 16% per level


@settings(max_examples=60, deadline=None)
@given(data=st.data(), sizes=st.lists(st.integers(1, 400), min_size=2, max_size=9), step=st.integers(1, 60),
       center=st.floats(0.05, 0.95), levels=st.integers(0, 6), rule=st.sampled_from(["global", "size"]))
def test_every_switch_keeps_total_non_zeros_exact(data, sizes, step, center, levels, rule):
    numels = [8 * s for s in sizes]
    grids = [level_grid(n, round(center, 3), step, levels) for n in numels]
    zeros = [z for _, z in grids]
    low, high = sum(z[0] for z in zeros), sum(z[-1] for z in zeros)
    target = data.draw(st.integers(low, high))
    problem, steps = sparsity_problem(numels, zeros, step, Fraction(target), rule)
    reached = sum(numels) - problem.budget
    assert abs(reached - target) * 2 <= step and (reached - low) % step == 0  # nearest reachable total
    wanted = [data.draw(st.floats(0, n)) for n in numels]
    config = nearest_levels(zeros, numels, step, wanted, steps)
    assert problem.feasible(config)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    group_totals = [sum(config[u] for u in g) for g in problem.groups]
    for _ in range(20):
        if all(n == 1 for n in problem.num_levels):
            break
        try:
            config = mutate(config, problem, rng, max_switches=3)
        except RuntimeError:  # NoMoveError: the budget pins every unit
            break
        assert problem.cost(config) == problem.budget  # every child is feasible: no rejection needed
        assert [sum(config[u] for u in g) for g in problem.groups] == group_totals


def test_nearest_levels_is_optimal_against_brute_force():
    import itertools

    numels, step = [40, 80, 160], 10
    zeros = [level_grid(n, 0.5, step, 3)[1] for n in numels]
    wanted = [13.0, 51.0, 77.0]
    for total in range(0, sum(len(z) - 1 for z in zeros) + 1):
        best = min((c for c in itertools.product(*(range(len(z)) for z in zeros)) if sum(c) == total),
                   key=lambda c: sum((z[lv] - w) ** 2 / n for z, lv, w, n in zip(zeros, c, wanted, numels)))
        got = nearest_levels(zeros, numels, step, wanted, total)
        cost = [sum((z[lv] - w) ** 2 / n for z, lv, w, n in zip(zeros, c, wanted, numels)) for c in (got, best)]
        assert cost[0] == pytest.approx(cost[1])


# --- database ------------------------------------------------------------------------------------


def test_database_is_compact_with_manifest(built):
    _, _, root, manifest = built
    assert manifest["method"] == "sparsegpt" and manifest["step"] == STEP and manifest["center"] == 0.5
    assert manifest["model_fingerprint"] and manifest["data_fingerprint"] and manifest["data"] == "random"
    assert manifest["bytes"] < 0.7 * manifest["dense_fp16_bytes"]  # mask + fp16 values, not dense copies
    name = "model.layers.1.mlp.down_proj"
    entry = manifest["layers"][name]
    tensors = load_file(str(layer_file(root, name)))
    numel = entry["shape"][0] * entry["shape"][1]
    for offset, zeros in enumerate(entry["zeros"], entry["first_offset"]):
        mask, values = tensors[f"{offset}.mask"], tensors[f"{offset}.values"]
        assert mask.dtype == torch.uint8 and mask.numel() == -(-numel // 8)
        assert values.dtype == torch.float16 and values.numel() == numel - zeros
    assert tensors["input_sq_norms"].shape == (entry["shape"][1],)


def test_database_round_trip_equals_sparsegpt(built):
    """Every stored level decodes to SparseGPT on the dense-input Hessian, rounded to fp16."""
    model, dense, _, manifest = built
    space = space_for(built, 0.5)
    hessians = {}
    model.load_state_dict(dense)
    calibrate_blocks(Decoder(model), _pool(), 4, lambda b, layers, acc: hessians.update(
        {n: a.hessian() for n, a in acc.items()}), progress=False)
    for u in (0, 6, 15):  # q_proj of block 0, down_proj of block 0, a block-2 layer
        name = space.units[u]
        with single_thread():  # as the build: BLAS results may depend on the thread count
            expected = sparsegpt_prune_levels(dense[f"{name}.weight"], hessians[name], space.zeros[u])
        for level, w in enumerate(expected):
            assert torch.equal(space.weight(u, level), w.half().float())
            assert int((space.weight(u, level) == 0).sum()) == space.zeros[u][level]


def test_encode_decode_round_trip():
    w = torch.randn(7, 13) * (torch.rand(7, 13) > 0.4)
    for dtype, stored in ((torch.float32, torch.float16), (torch.bfloat16, torch.bfloat16)):
        t = encode_level(-2, w.to(dtype))
        assert t["-2.values"].dtype == stored
        assert torch.equal(decode_level(t["-2.mask"], t["-2.values"], (7, 13), dtype), w.to(dtype).to(stored).to(dtype))


def test_database_refuses_another_model_or_data(built):
    _, _, root, _ = built
    with pytest.raises(UserError, match="another model"):
        SparsitySpace(Decoder(tiny_model(layers=3, seed=5)), 0.5, db=str(root))
    space = space_for(built, 0.5)
    space.check_calibration(_pool())
    with pytest.raises(UserError, match="built on data 'random'"):
        space.check_calibration(TokenPool(_pool().windows, "wiki"))
    with pytest.raises(UserError, match="no database"):
        SparsitySpace(space.decoder, 0.5, db=str(root / "missing"))


def test_levels_are_read_on_demand_within_the_cache_budget(built, monkeypatch):
    """A database larger than EVOPRESS_DB_CACHE_GB still serves every level, evicting the oldest."""
    full = space_for(built, 0.5)
    assert full._variants.bytes == 0  # nothing read before it is needed
    expected = {(u, lv): full.weight(u, lv) for u in (0, 5, 9) for lv in range(len(full.zeros[u]))}
    one_level = sum(t.numel() * t.element_size() for t in full._variants.get(full.units[9],
                                                                                  full._level_keys(9, 0)).values())
    monkeypatch.setenv(CACHE_ENV, str(1.5 * one_level / 2**30))
    monkeypatch.setattr(SparsitySpace, "DECODED_CACHE_BYTES", 0)  # every weight() reads its level again
    small = space_for(built, 0.5)
    for _ in range(2):
        for (u, lv), w in expected.items():
            assert torch.equal(small.weight(u, lv), w)
            assert small._variants.bytes <= small._variants._lru.max_bytes
    assert len(small._variants._lru) <= 2
    monkeypatch.setenv(CACHE_ENV, "lots")
    with pytest.raises(UserError, match=CACHE_ENV):
        space_for(built, 0.5)



def test_decoded_levels_are_reused_within_their_budget(built, monkeypatch):
    layer_bytes = space_for(built, 0.5).weight(9, 0).numel() * 4
    monkeypatch.setattr(SparsitySpace, "DECODED_CACHE_BYTES", 2 * layer_bytes)
    space = space_for(built, 0.5)
    for u in (9, 8, 9):
        for lv in range(len(space.zeros[u])):
            assert torch.equal(space.weight(u, lv), space.decode(u, lv))
            assert space._decoded.bytes <= 2 * layer_bytes
    assert space.weight(9, 1) is space.weight(9, 1)  # the second call is a hit, not a decode

# --- the space -----------------------------------------------------------------------------------


def test_apply_rewrites_only_changed_layers_and_restores_dense(built):
    space = space_for(built, 0.5)
    model, dense = built[0], built[1]
    config = space.random_config(np.random.default_rng(0))
    space.apply(config)
    for u, name in enumerate(space.units):
        assert int((model.get_submodule(name).weight == 0).sum()) == space.zeros[u][config[u]]
    calls = []
    original = space.weight
    space.weight = lambda u, lv: calls.append(u) or original(u, lv)
    changed = list(config)
    changed[3] = (changed[3] + 1) % space.problem.num_levels[3]
    space.apply(tuple(changed))
    assert calls == [3]
    space.apply(None)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in dense.items())


def test_uniform_start_budget_report_and_random_configs(built):
    space = space_for(built, 0.5)
    start = space.uniform_config()
    assert space.initial_configs(np.random.default_rng(0), 8) == [start]
    assert all(space.level_labels(u)[lv] == 0 for u, lv in enumerate(start))  # the centre level everywhere
    report = space.budget_report(start)
    assert report["exact"] and report["achieved"] == 0.5 and report["layer_sparsity_range"] == [0.5, 0.5]
    assert report["zeros"] + report["non_zeros"] == report["weights"] == space.weights
    randoms = space.random_configs(np.random.default_rng(1), 4)
    assert len(randoms) == 4 and all(space.problem.feasible(c) and c != start for c in randoms)


@pytest.mark.parametrize("target", [0.47, 0.5301, 0.5625])
def test_targets_away_from_the_centre_meet_the_nearest_reachable_budget(built, target):
    space = space_for(built, target)
    start = space.uniform_config()
    report = space.budget_report(start)
    assert space.problem.feasible(start)
    assert abs(report["zeros"] - target * space.weights) <= STEP / 2
    assert max(abs(s - target) for s in space.layer_sparsity(start)) <= STEP / 512  # within a step of k/v


def test_target_outside_the_database_is_refused(built):
    with pytest.raises(UserError, match="outside database"):
        space_for(built, 0.95)


def test_size_rule_switches_only_between_equal_size_layers(built):
    space = space_for(built, 0.5, group_rule="size")
    assert sorted(len(g) for g in space.problem.groups) == [6, 6, 9]  # k/v, q/o, gate/up/down
    assert all(len({space.numels[u] for u in g}) == 1 for g in space.problem.groups)
    assert space.options()["group_rule"] == "size"


# --- baselines -----------------------------------------------------------------------------------


def test_owl_allocation_averages_exactly_to_the_target():
    rng = np.random.default_rng(0)
    for _ in range(20):
        lod, sizes = rng.random(12), rng.integers(1, 1000, 12)
        target, lam = float(rng.uniform(0.3, 0.8)), float(rng.choice([0.02, 0.08, 0.2]))
        s = owl_sparsities(lod, target, lam, sizes)
        assert np.dot(s, sizes) / sizes.sum() == pytest.approx(target, abs=1e-12)
        assert s.max() - s.min() == pytest.approx(2 * lam)
        assert s[np.argmax(lod)] == s.min()  # most outliers: least sparse
    assert np.allclose(owl_sparsities(np.ones(4), 0.6, 0.1, np.ones(4)), 0.6)


def test_uniform_and_owl_baselines(built):
    space = space_for(built, 0.5)
    ctx = BaselineInputs(space, Evaluator(space, _pool()), _pool(), tokens=64, seed=0)
    assert uniform(ctx) == space.uniform_config()
    grid = owl_configs(space)
    assert len(grid) == 20 and all(space.problem.feasible(c) for c in grid.values())
    assert owl(ctx) in grid.values()
    spread = grid[(0.2, 3.0)]
    per_block = [np.mean([s for s, b in zip(space.layer_sparsity(spread), space.unit_block) if b == blk])
                 for blk in range(3)]
    assert max(per_block) - min(per_block) > 0.1  # a wide lambda really moves sparsity between blocks


# --- export and CLI ------------------------------------------------------------------------------


def test_export_reloads_to_the_searched_model(built, tmp_path):
    from transformers import AutoModelForCausalLM

    space = space_for(built, 0.5)
    config = space.random_config(np.random.default_rng(2))
    ids, expected = logits_under(space, config)
    summary = export(space, config, tmp_path, SimpleNamespace(save_pretrained=lambda out: None))
    space.apply(None)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert torch.equal(reloaded(ids).logits, expected)
    profile = json.loads((tmp_path / PROFILE).read_text())
    assert summary["achieved_sparsity"] == 0.5 and profile["achieved"] == 0.5
    assert [profile["layers"][n]["zeros"] for n in space.units] == [z[lv] for z, lv in zip(space.zeros, config)]


def test_sparse_bitmask_export_reproduces_the_logits_and_is_smaller(built, tmp_path):
    import evopress
    from compressed_tensors.utils import pack_bitmasks, unpack_bitmasks
    from safetensors.torch import load_file

    space = space_for(built, 0.5)
    config = space.random_config(np.random.default_rng(3))
    ids, expected = logits_under(space, config)
    tokenizer = SimpleNamespace(save_pretrained=lambda out: None)
    summary = export_bitmask(space, config, tmp_path / "bitmask", tokenizer)
    export(space, config, tmp_path / "dense", tokenizer)
    space.apply(None)
    assert torch.equal(evopress.load_compressed(tmp_path / "bitmask")(ids).logits, expected)
    raw = load_file(str(tmp_path / "bitmask" / "model.safetensors"))
    qc = json.loads((tmp_path / "bitmask" / "config.json").read_text())["quantization_config"]
    assert qc["sparsity_config"]["format"] == "sparse-bitmask" and qc["sparsity_config"]["targets"] == space.units
    for name, layer in zip(space.units, space.layers):  # compressed-tensors' own bit packing, both ways
        space.apply(config)
        weight = layer.weight.detach().clone()
        space.apply(None)
        mask = raw[f"{name}.bitmask"]  # compressed-tensors 0.14.0.1 names the parts <module>.<part>
        assert torch.equal(mask, pack_bitmasks(weight != 0))
        assert torch.equal(unpack_bitmasks(mask, list(weight.shape)), weight != 0)
        assert torch.equal(raw[f"{name}.compressed"], weight[weight != 0])
        counts = (weight != 0).sum(dim=-1)
        assert torch.equal(raw[f"{name}.row_offsets"], torch.cumsum(counts, 0) - counts)
        assert raw[f"{name}.shape"].tolist() == list(weight.shape) and f"{name}.weight" not in raw
    dense_bytes = (tmp_path / "dense" / "model.safetensors").stat().st_size
    assert summary["weights_bytes"] < dense_bytes
    assert json.loads((tmp_path / "bitmask" / PROFILE).read_text())["format"] == "sparse-bitmask"


def test_cli_build_search_baselines_export_report(tiny_checkpoint, tmp_path):
    from evopress.cli import main

    model, text = tiny_checkpoint
    common = ["--model", str(model), "--data", str(text), "--seq-len", "32", "--calib-tokens", "256", "--quiet"]
    db = tmp_path / "db"
    assert main(["build-db", "--space", "sparsity", "--target", "0.6", "--levels", "2", "--out", str(db), *common]) == 0
    run = ["--space", "sparsity", "--db", str(db), "--final-tokens", "64", *common]
    assert main(["search", "--target", "0.6", "--generations", "2", "--offspring", "3", "--stages", "1:32",
                 "--initial-tokens", "32", "--init-from", "owl", "--out", str(tmp_path / "evo"), *run,
                 "--calib-tokens", "4096"]) == 0  # OWL's variants compete on 4,096 tokens (baseline_tokens)
    for method in ("uniform", "owl"):
        assert main(["baseline", "--method", method, "--target", "0.6", "--tokens", "32",
                     "--out", str(tmp_path / method), *run]) == 0
    result = json.loads((tmp_path / "evo" / "result.json").read_text())
    assert abs(result["budget"]["achieved"] - 0.6) < 1e-4  # nearest reachable: 0.6 * numel is not integral
    assert main(["export", str(tmp_path / "evo"), "--out", str(tmp_path / "export"), "--quiet"]) == 0
    assert (tmp_path / "export" / PROFILE).is_file()
    assert main(["export", str(tmp_path / "evo"), "--out", str(tmp_path / "bitmask"), "--format", "sparse-bitmask",
                 "--quiet"]) == 0
    assert (tmp_path / "bitmask" / "model.safetensors").stat().st_size < \
        (tmp_path / "export" / "model.safetensors").stat().st_size
    dirs = [str(tmp_path / d) for d in ("evo", "owl", "uniform")]
    assert main(["report", *dirs, "--out", str(tmp_path / "report"), "--quiet"]) == 0
    assert (tmp_path / "report" / "profile.png").stat().st_size > 1000
    assert main(["search", "--target", "0.99", "--out", str(tmp_path / "bad"), *run]) == 2  # outside the levels


def test_cli_refuses_a_foreign_or_truncated_database(tiny_checkpoint, tmp_path, capsys):
    from evopress.cli import main

    from .conftest import write_tiny_checkpoint

    model, text = tiny_checkpoint
    data = ["--data", str(text), "--seq-len", "32", "--calib-tokens", "256", "--quiet"]
    db = tmp_path / "db"
    assert main(["build-db", "--space", "sparsity", "--levels", "1", "--out", str(db), "--model", str(model),
                 *data]) == 0
    other, _ = write_tiny_checkpoint(tmp_path / "other", layers=4)
    run = ["search", "--space", "sparsity", "--target", "0.5", "--db", str(db), "--generations", "1",
           "--offspring", "2", "--stages", "1:32", "--initial-tokens", "32", "--final-tokens", "32", "--init-from",
           "none", *data]
    capsys.readouterr()
    assert main([*run, "--model", str(other), "--out", str(tmp_path / "a")]) == 2
    assert "built for another model" in capsys.readouterr().err
    layer = next((db / "layers").iterdir())
    layer.write_bytes(layer.read_bytes()[:100])  # a copy cut short
    assert main([*run, "--model", str(model), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupt" in err[0] and "rebuild" in err[0], err


@pytest.mark.real_model
def test_real_model_budget_and_levels(tmp_path):
    """SmolLM2-135M: real GQA shapes, default step, exact 50% uniform budget; magnitude keeps it fast."""
    from evopress.cli import main

    small = ["--calib-tokens", "256", "--seq-len", "128", "--quiet"]
    db = tmp_path / "db"
    assert main(["build-db", "--space", "sparsity", "--method", "magnitude", "--levels", "0", "--out", str(db),
                 *small]) == 0
    manifest = json.loads((db / "manifest.json").read_text())
    assert manifest["step"] == 17_694 and len(manifest["layers"]) == 210
    assert manifest["layers"]["model.layers.0.self_attn.k_proj"]["zeros"] == [55_296]
    out = tmp_path / "uniform"
    assert main(["baseline", "--space", "sparsity", "--method", "uniform", "--target", "0.5", "--db", str(db),
                 "--final-tokens", "128", "--tokens", "128", "--out", str(out), *small]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["budget"]["exact"] and f"{result['budget']['achieved']:.4f}" == "0.5000"
    assert result["budget"]["weights"] == 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 576 * 1536)
    assert 0 < result["fitness"]["kl"] < 5


@pytest.mark.parametrize("cache_bytes", [1 << 30, 16 * 32 * 4 * 24, 1])  # ample, evicting, none
def test_prefix_reuse_equals_full_forward(built, cache_bytes):
    space = space_for(built, 0.5)
    configs = space.random_configs(np.random.default_rng(7), 6)
    # children of one parent share prefixes, as in a real generation
    configs += [mutate(configs[0], space.problem, np.random.default_rng(s), 3) for s in range(4)]
    assert_prefix_reuse_matches_full_forward(space, _pool(), configs, cache_bytes)
    space.apply(None)


def test_size_in_bytes_counts_non_zeros_and_the_mask(built):
    space = space_for(built, 0.5)
    start = space.uniform_config()
    report = space.budget_report(start)
    assert space.dense_bytes() == 4 * space.weights  # fp32, no biases
    assert space.size_bytes(start) == (32 * report["non_zeros"] + space.weights) // 8
