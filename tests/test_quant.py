"""Quantization space: packed GPTQ database, exact bit budgets, DP baseline, compressed-tensors export."""

import itertools
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from evopress.compressors.packing import packed_numel
from evopress.database import layer_file
from evopress.errors import UserError
from evopress.spaces.plugin import BaselineInputs
from evopress.spaces.quant.baselines import dp, uniform
from evopress.spaces.quant.build import packed_keys
from evopress.spaces.quant.export import (GPTQMODEL, PROFILE, RECIPE, export_quantized, load_compressed,
                                          pack_rows_int32, read_compressed_weights, unpack_rows_int32)
from evopress.spaces.quant.levels import default_group_size, default_levels, exact_knapsack, max_reachable, packed_bytes
from evopress.models import Decoder
from evopress.evolution import mutate
from evopress.spaces import make_space
from evopress.spaces.quant.space import QuantSpace

from .conftest import assert_prefix_reuse_matches_full_forward, logits_under, tiny_model, tiny_quant_database

BITS = (2, 3, 4, 5, 6, 8)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A 3-block tiny Llama, its dense weights, and a database at 2..8 bits (group 16, 3-bit calibration)."""
    return tiny_quant_database(tmp_path_factory.mktemp("qdb"), 3, BITS)


def space_for(built, target, **options):
    model, dense, _, root, _ = built
    model.load_state_dict(dense)
    return QuantSpace(Decoder(model), target, db=str(root), **options)


def test_database_is_packed_with_manifest(built):
    model, _, _, root, manifest = built
    assert manifest["bits"] == list(BITS) and manifest["group_size"] == 16 and manifest["calib_bits"] == 3
    assert manifest["model_fingerprint"] and manifest["data_fingerprint"] and (root / "manifest.json").is_file()
    name = "model.layers.1.mlp.down_proj"
    out, n = manifest["layers"][name]
    tensors = load_file(str(layer_file(root, name)))
    for b in BITS:
        assert tensors[f"{b}.codes"].dtype == torch.uint8 and tensors[f"{b}.codes"].numel() == packed_numel(out * n, b)
        assert tensors[f"{b}.scales"].dtype == torch.float16 and tensors[f"{b}.scales"].shape == (out, n // 16)
    assert not any(t.dtype in (torch.float32, torch.bfloat16) for t in tensors.values())
    errs = manifest["errors"][name]
    assert errs["2"] > errs["4"] > errs["8"] >= 0  # more bits, less output error


def test_database_refuses_another_model(built):
    _, _, _, root, _ = built
    with pytest.raises(UserError, match="another model"):
        QuantSpace(Decoder(tiny_model(layers=3, seed=5)), 3.0, db=str(root))


def test_apply_dequantizes_changed_layers_and_restores_dense(built, monkeypatch):
    monkeypatch.setattr(QuantSpace, "DECODED_CACHE_BYTES", 1 << 30)  # the stash (none by default on CPU)
    space = space_for(built, 3.0)
    model, dense = built[0], built[1]
    rng = np.random.default_rng(0)
    config = space.random_config(rng)
    space.apply(config)
    for u, name in enumerate(space.units):
        expected = space.quantized(u, space.bits[config[u]]).dequantize()
        assert torch.equal(model.get_submodule(name).weight, expected)
    calls = []
    original = space.quantized
    space.quantized = lambda u, b: calls.append(u) or original(u, b)
    changed = list(config)
    changed[0] = (changed[0] + 1) % len(space.bits)
    space.apply(tuple(changed))
    assert calls == [0]  # only the layer that changed is rewritten
    space.apply(None)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in dense.items())
    space.apply(tuple(changed))
    assert calls == [0]  # back from dense (a teacher pass) to the same bitwidths: stashed, not dequantized
    expected = space.quantized(1, space.bits[changed[1]]).dequantize()
    assert torch.equal(model.get_submodule(space.units[1]).weight, expected)
    space.apply(None)


@pytest.mark.parametrize("rules", [None, [{"match": "re:.*down_proj", "min": 3}]])
def test_retarget_shares_the_database_and_caches_and_equals_a_fresh_space(built, monkeypatch, rules):
    """pareto's next budget: only the budget is rebuilt; the database, its caches and the layers are shared."""
    monkeypatch.setattr(QuantSpace, "DECODED_CACHE_BYTES", 1 << 30)
    model, dense, _, root, _ = built
    model.load_state_dict(dense)
    decoder, options = Decoder(model), {"db": str(root), **({"rules": rules} if rules else {})}
    low = make_space("quant", decoder, 2.5, options)
    low.apply(low.random_config(np.random.default_rng(0)))
    low.apply(None)
    high = make_space("quant", decoder, 4.5, options, reuse=low)
    fresh = make_space("quant", decoder, 4.5, options)
    inner, old = high.model_space, low.model_space
    assert type(high) is type(fresh) and inner is not old
    assert inner.db is old.db and inner._variants is old._variants and inner._decoded is old._decoded
    assert len(inner._decoded) > 0 and inner._current is old._current
    assert high.problem == fresh.problem and high.target == inner.target == 4.5 and old.target == 2.5
    config = high.random_config(np.random.default_rng(1))
    high.apply(config)
    shared = {k: v.clone() for k, v in model.state_dict().items()}
    high.apply(None)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in dense.items())  # dense again
    fresh.apply(config)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in shared.items())  # the same weights
    fresh.apply(None)
    with pytest.raises(UserError, match="above the most expensive"):
        make_space("quant", decoder, 7, options, reuse=high)


@pytest.mark.parametrize("target, exact", [(2.25, False), (2.5, True), (3.5, True), (3.0, True)])
def test_fractional_targets_meet_the_nearest_feasible_budget(built, target, exact):
    space = space_for(built, target)
    brute = max_reachable(space.problem.costs, space.target_bits)
    assert space.problem.budget == brute <= target * space.numel
    inits = space.initial_configs(np.random.default_rng(0), 8)
    assert all(space.problem.feasible(c) for c in inits)
    report = space.budget_report(inits[0])
    assert report["exact"] is exact and report["achieved"] == space.problem.budget / space.numel
    if target == 3.0:
        assert inits == [(1,) * len(space.units)]  # integer target: uniform 3 bits, as the paper
    else:
        assert len(inits) == 8 and max(max(c) for c in inits) <= int(np.ceil(target)) - 2  # start at ceil(target)


def test_overhead_accounting_counts_scales_and_zero_points(built):
    space = space_for(built, 3.5, overhead=True)
    config = space.initial_configs(np.random.default_rng(0), 2)[0]
    report = space.budget_report(config)
    assert "true bits" in report["accounting"] and report["achieved"] == report["true_bits_per_weight"] <= 3.5
    assert report["true_bits_per_weight"] - report["weight_bits_per_weight"] == pytest.approx(
        sum((16 + space.bits[lv]) * o * i // 16 for lv, (o, i) in zip(config, space.shapes)) / space.numel)
    assert space.uniform_level() is None  # no integer bitwidth meets a true-bits budget exactly


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), target=st.sampled_from([2.25, 2.5, 3.0, 3.5, 4.75]),
       overhead=st.booleans(), rule=st.sampled_from(["size", "name"]))
def test_budget_stays_exact_under_level_switches(built, seed, target, overhead, rule):
    space = space_for(built, target + 1.5 * overhead, overhead=overhead, group_rule=rule)  # group-16 metadata
    rng = np.random.default_rng(seed)
    config = space.random_config(rng)
    for _ in range(30):
        config = mutate(config, space.problem, rng, max_switches=3)
        assert space.problem.cost(config) == space.problem.budget  # no child ever needs rejecting


def test_default_levels_and_group_size():
    assert default_levels([2, 3, 4, 5, 6, 8]) == (2, 3, 4, 5, 6)
    assert default_levels([2, 4, 6, 8]) == (2, 4, 6, 8)
    assert default_group_size([576, 1536]) == 64 and default_group_size([4096, 11008]) == 128
    assert default_group_size([100]) == -1


def test_random_config_falls_back_to_an_exact_dp(built):
    space = space_for(built, 2.5)
    config = space.random_config(np.random.default_rng(3), attempts=0)
    assert space.problem.feasible(config)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_dp_is_optimal_against_brute_force(data):
    units = data.draw(st.integers(1, 5))
    levels = data.draw(st.integers(1, 4))
    costs = [data.draw(st.lists(st.integers(0, 12), min_size=levels, max_size=levels)) for _ in range(units)]
    errors = [data.draw(st.lists(st.floats(0, 10), min_size=levels, max_size=levels)) for _ in range(units)]
    budget = data.draw(st.integers(0, 12 * units))
    totals = {c: sum(costs[u][lv] for u, lv in enumerate(c)) for c in itertools.product(range(levels), repeat=units)}
    feasible = [c for c, t in totals.items() if t == budget]
    got = exact_knapsack(costs, errors, budget)
    if not feasible:
        assert got is None
    else:
        assert got is not None and totals[got] == budget
        best = min(sum(errors[u][lv] for u, lv in enumerate(c)) for c in feasible)
        assert sum(errors[u][lv] for u, lv in enumerate(got)) == pytest.approx(best)
    below = [t for t in totals.values() if t <= budget]
    assert max_reachable(costs, budget) == (max(below) if below else None)


def _ctx(space, target):
    return BaselineInputs(space, evaluator=None, pool=None, tokens=0, seed=0)


def test_uniform_and_dp_baselines(built):
    space = space_for(built, 3.0)
    assert uniform(_ctx(space, 3.0)) == (1,) * len(space.units)
    errors = space.db.manifest["errors"]

    def total(c):
        return sum(errors[n][str(space.bits[lv])] for n, lv in zip(space.units, c))

    config = dp(_ctx(space, 3.0))
    assert space.problem.feasible(config) and total(config) <= total(uniform(_ctx(space, 3.0)))
    frac = space_for(built, 2.5)
    assert frac.problem.feasible(dp(_ctx(frac, 2.5)))
    with pytest.raises(UserError, match="uniform needs"):
        uniform(_ctx(frac, 2.5))


def test_baselines_respect_rules(built):
    model, dense = built[0], built[1]
    model.load_state_dict(dense)
    rules = [{"match": "re:.*self_attn\\.[qkv]_proj", "tie": True}, {"match": "re:.*down_proj", "min": 4}]
    space = make_space("quant", Decoder(model), 3.0, {"db": str(built[3]), "rules": rules})
    config = space.model_space.layer_bits(space.to_model_levels(dp(_ctx(space, 3.0))))
    assert all(b >= 4 for n, b in config.items() if n.endswith("down_proj"))
    assert len({config[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv"}) == 1


@pytest.mark.parametrize("bits", range(1, 9))
def test_int32_row_packing_round_trips(bits):
    codes = torch.randint(0, 1 << bits, (5, 45), dtype=torch.uint8)  # 45: not a multiple of 32
    packed = pack_rows_int32(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (5, -(-45 * bits // 32))
    assert torch.equal(unpack_rows_int32(packed, bits, 45), codes)


def test_int32_packing_matches_compressed_tensors():
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    for bits in range(1, 9):
        codes = torch.randint(0, 1 << bits, (6, 70), dtype=torch.uint8)
        signed = (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
        assert torch.equal(pack_rows_int32(codes, bits), helpers.pack_to_int32(signed, bits))


def test_export_reloads_to_the_searched_model(built, tmp_path):
    space = space_for(built, 2.5)
    config = dp(_ctx(space, 2.5))

    class Tokenizer:  # export only calls save_pretrained
        def save_pretrained(self, out):
            (out / "tokenizer.json").write_text("{}")

    summary = export_quantized(space, config, tmp_path, Tokenizer())
    ids, expected = logits_under(space, config)
    space.apply(None)
    reloaded = load_compressed(tmp_path)
    assert torch.equal(reloaded(ids).logits, expected)  # bit-exact: same codes, same fp32 arithmetic
    layer_bits = space.layer_bits(config)
    assert summary["layers_per_bitwidth"] == space.budget_report(config)["layers_per_bitwidth"]
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    targets = [t for g in qc["config_groups"].values() for t in g["targets"]]
    assert sorted(targets) == sorted(space.units) and qc["format"] == "pack-quantized"
    gptq = json.loads((tmp_path / GPTQMODEL).read_text())
    assert all(gptq["dynamic"][f"+:^{n.replace('.', chr(92) + '.')}$"]["bits"] == b
               for n, b in layer_bits.items() if b != gptq["bits"])
    recipe = yaml.safe_load((tmp_path / RECIPE).read_text())["quant_stage"]["quant_modifiers"]["GPTQModifier"]
    assert {n: g["weights"]["num_bits"] for g in recipe["config_groups"].values() for n in g["targets"]} == layer_bits
    assert json.loads((tmp_path / PROFILE).read_text())["layer_bits"] == layer_bits
    # the column order as built, stated explicitly (the database is built with act-order by default)
    assert space.db.manifest["act_order"] is True
    assert recipe["actorder"] == "static" and gptq["desc_act"] is True and gptq["static_groups"] is True


def test_export_decodes_identically_with_compressed_tensors(built, tmp_path):
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    space = space_for(built, 3.5)
    config = space.random_config(np.random.default_rng(1))
    export_quantized(space, config, tmp_path, SimpleNamespace(save_pretrained=lambda out: None))
    qc = QuantizationConfig.model_validate(json.loads((tmp_path / "config.json").read_text())["quantization_config"])
    ours = read_compressed_weights(tmp_path)
    raw = load_file(str(tmp_path / "model.safetensors"))
    compressor = BaseCompressor.get_value_from_registry(qc.format)
    for scheme in qc.config_groups.values():
        for name in scheme.targets:
            parts = {k.rsplit(".", 1)[1]: v for k, v in raw.items() if k.rsplit(".", 1)[0] == name}
            theirs = compressor.decompress(parts, scheme)["weight"].float()  # fp16 arithmetic on their side
            torch.testing.assert_close(theirs, ours[f"{name}.weight"], rtol=1e-3, atol=1e-3)
    assert ct.__version__


def test_cli_build_search_baselines_export_report(tiny_checkpoint, tmp_path):
    from evopress.cli import main

    model, text = tiny_checkpoint
    common = ["--model", str(model), "--data", str(text), "--seq-len", "32", "--calib-tokens", "512", "--quiet"]
    db = tmp_path / "db"
    assert main(["build-db", "--space", "quant", "--bits", "2,3,4,8", "--out", str(db), *common]) == 0
    manifest = json.loads((db / "manifest.json").read_text())
    assert manifest["group_size"] == 32 and manifest["calib_bits"] == 3
    run = ["--space", "quant", "--db", str(db), "--final-tokens", "128", *common]
    assert main(["search", "--target", "2.5", "--generations", "3", "--offspring", "4", "--stages", "2:32,1:64",
                 "--initial-candidates", "3", "--initial-tokens", "64", "--init-from", "none",
                 "--out", str(tmp_path / "evo"), *run]) == 0
    for method, target in (("dp", "2.5"), ("random", "2.5"), ("uniform", "3")):
        assert main(["baseline", "--method", method, "--target", target, "--tokens", "64",
                     "--candidates", "3", "--out", str(tmp_path / method), *run]) == 0
    result = json.loads((tmp_path / "evo" / "result.json").read_text())
    assert result["space_options"]["bits"] == [2, 3, 4]  # 8 is past the gap: not a default level
    assert result["budget"]["exact"] and result["budget"]["achieved"] == 2.5 and "weight bits" in \
        result["budget"]["accounting"]
    assert main(["export", str(tmp_path / "evo"), "--out", str(tmp_path / "export"), "--quiet"]) == 0
    assert (tmp_path / "export" / "model.safetensors").is_file()
    dirs = [str(tmp_path / d) for d in ("evo", "dp", "uniform")]
    assert main(["report", *dirs, "--out", str(tmp_path / "report"), "--quiet"]) == 0
    assert (tmp_path / "report" / "profile.png").stat().st_size > 1000


@pytest.mark.parametrize("cache_bytes", [1 << 30, 16 * 32 * 4 * 24, 1])  # ample, evicting, none
def test_prefix_reuse_equals_full_forward(built, cache_bytes):
    space = space_for(built, 3.0)
    configs = space.random_configs(np.random.default_rng(7), 6)
    # children of one parent share prefixes, as in a real generation
    configs += [mutate(configs[0], space.problem, np.random.default_rng(s), 3) for s in range(4)]
    assert_prefix_reuse_matches_full_forward(space, built[2], configs, cache_bytes)
    space.apply(None)


def test_size_in_bytes_counts_codes_scales_and_zero_points(built):
    space = space_for(built, 3.0)  # weight-bit accounting: the size is the true one all the same
    config = space.initial_configs(np.random.default_rng(0), 1)[0]
    assert space.dense_bytes() == sum(m.weight.numel() * m.weight.element_size() for m in space.layers)
    true_bits = space.budget_report(config)["true_bits_per_weight"] * space.numel
    written = sum(packed_bytes(space.bits[lv], s, space.grid(space.bits[lv])) for lv, s in zip(config, space.shapes))
    assert space.size_bytes(config) == written >= true_bits / 8  # what the export writes (tested in test_joint)
    assert space.size_bytes((0,) * len(config)) < space.size_bytes(config) < space.size_bytes((4,) * len(config))


def test_build_db_uses_act_order_unless_told_not_to(tiny_checkpoint, tmp_path):
    """Act-order (static groups) is the default build; ``--no-act-order`` keeps the paper's column order and
    ``--symmetric`` builds the symmetric grid. Each solves the same layers differently, and each manifest
    says which it is."""
    from evopress.cli import main

    model, text = tiny_checkpoint
    common = ["build-db", "--space", "quant", "--bits", "2,3", "--model", str(model), "--data", str(text),
              "--seq-len", "32", "--calib-tokens", "256", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "act")]) == 0
    assert main([*common, "--no-act-order", "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--symmetric", "--out", str(tmp_path / "sym")]) == 0
    builds = ("act", "plain", "sym")
    manifests = [json.loads((tmp_path / d / "manifest.json").read_text()) for d in builds]
    assert [(m["act_order"], m["symmetric"]) for m in manifests] == [(True, False), (False, False), (True, True)]
    name = "model.layers.0.mlp.down_proj"
    codes = [load_file(str(layer_file(tmp_path / d, name)))[packed_keys(2)["codes"]] for d in builds]
    assert not torch.equal(codes[0], codes[1]) and not torch.equal(codes[0], codes[2])


def test_symmetric_export_loads_with_plain_from_pretrained(tmp_path):
    """A database built on the symmetric grid exports a checkpoint that transformers loads by itself
    (compressed-tensors decompresses it), computing exactly the searched model; every layer's bytes in
    the file are what the space counts (no zero points), and the configs say symmetric."""
    from transformers import AutoModelForCausalLM

    model, dense, _, root, manifest = tiny_quant_database(tmp_path / "db", 3, (2, 3, 4), symmetric=True)
    assert manifest["symmetric"] is True
    space = QuantSpace(Decoder(model), 4.0, db=str(root), overhead=True)  # scales: 1 bit per weight at group 16
    config = space.random_config(np.random.default_rng(2))
    assert len(set(space.layer_bits(config).values())) > 1  # mixed bitwidths: one config group each
    for u, b in enumerate(space.layer_bits(config).values()):
        q = space.quantized(u, b)
        assert q.grid.symmetric and bool((q.zeros == 1 << (b - 1)).all())
    out = tmp_path / "export"
    export_quantized(space, config, out, SimpleNamespace(save_pretrained=lambda out: None))
    ids, expected = logits_under(space, config)
    space.apply(None)
    raw = load_file(str(out / "model.safetensors"))
    assert not any(k.endswith("weight_zero_point") for k in raw)
    for (name, b), shape in zip(space.layer_bits(config).items(), space.shapes):
        stored = sum(v.numel() * v.element_size() for k, v in raw.items() if k.rsplit(".", 1)[0] == name)
        assert stored == packed_bytes(b, shape, space.grid(b))
    true_bits = space.budget_report(config)["true_bits_per_weight"] * space.numel
    assert space.problem.cost(config) == true_bits  # overhead accounting: scales only
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32)
    assert any(n.endswith("weight_packed") for n, _ in loaded.named_parameters())  # compressed-tensors' own path
    assert torch.equal(loaded(ids).logits, expected)
    assert torch.equal(load_compressed(out)(ids).logits, expected)
    recipe = yaml.safe_load((out / RECIPE).read_text())["quant_stage"]["quant_modifiers"]["GPTQModifier"]
    assert {g["weights"]["symmetric"] for g in recipe["config_groups"].values()} == {True}
    assert json.loads((out / GPTQMODEL).read_text())["sym"] is True
    assert json.loads((out / PROFILE).read_text())["symmetric"] is True
