"""Joint space with --with-sparsity: combined levels' bytes and order, exact zeros, database pairing, export."""

import copy
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evopress import load_compressed
from evopress.compressors.gptq import quantize_rtn
from evopress.errors import UserError
from evopress.evolution import offspring
from evopress.models import Decoder
from evopress.spaces import make_space
from evopress.spaces.joint.combined import decode, encode, sparse_packed_bytes
from evopress.spaces.joint.export import SPARSITY, export
from evopress.spaces.joint.space import labels
from evopress.spaces.joint.layers import LayerLevel
from evopress.spaces.quant.levels import packed_bytes
from evopress.spaces.sparsity.storage import decode_level, level_keys
from evopress.spaces.textconfig import LABELLED

from .conftest import (
    assert_mutations_stay_in_the_byte_window, assert_random_and_mutants_reuse_exactly, logits_under,
    tiny_model, tiny_quant_database, tiny_sparsity_database)

TOL = 0.03  # as in test_joint: a 32-wide model's layer steps need a wide window


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A 4-block tiny Llama, its dense weights, a quant database (2, 3, 4 bits, group 16) and a SparseGPT
    database (50% +- 4 levels of 24 weights) of the same model and data."""
    model, dense, pool, qdb, _ = tiny_quant_database(tmp_path_factory.mktemp("jq"), 4, (2, 3, 4))
    sdb = tmp_path_factory.mktemp("js")
    tiny_sparsity_database(sdb, model, pool)
    return model, dense, pool, qdb, sdb


def joint(built, target, model=None, **options):
    model_, dense, _, qdb, sdb = built
    if model is None:
        model = model_
        model.load_state_dict(dense)
    return make_space("joint", Decoder(model), target,
                      {"db": str(qdb), "tolerance": TOL, "with_sparsity": str(sdb), **options})


def stored_sparse(space, u, level):
    """The sparsity database's weight of layer ``u`` at ``level`` (float32) and its mask."""
    sparse = space.quant.sparse
    mask_key, values_key = level_keys(sparse.first_offsets[u] + level.sparse)
    t = sparse.stored(u, (mask_key, values_key))
    weight = decode_level(t[mask_key], t[values_key], space.quant.shapes[u], torch.float32)
    return weight, weight != 0


def test_levels_are_bitwidths_and_cheaper_combinations_sorted_by_bytes(built):
    space = joint(built, 2.5)
    q = space.quant
    for u in range(space.layers):
        levels, shape = space.levels[u], q.shapes[u]
        costs = [lv.cost for lv in levels]
        assert costs == sorted(costs) == list(space.problem.costs[u])
        assert [lv.bits for lv in levels if lv.sparse is None] == list(q.bits)
        assert levels[-1] == LayerLevel(len(q.bits) - 1, q.bits[-1], packed_bytes(q.bits[-1], shape, q.grid(4)))
        combined = [lv for lv in levels if lv.sparse is not None]
        assert {lv.bits for lv in combined} == set(q.bits)  # every bitwidth combines with some sparsity
        for lv in combined:
            assert 0 < lv.zeros and lv.cost < packed_bytes(lv.bits, shape, q.grid(lv.bits))  # only cheaper ones
        assert len(set(map(str, space.level_labels(u)))) == len(levels)
    assert space.level_labels(0)[-1] == 4 and "50%@3" in space.level_labels(0)


def test_combined_bytes_are_the_stated_layout_and_zeros_stay_exact(built):
    space = joint(built, 2.5)
    q = space.quant
    for u in (0, 1, 5):  # q (32x32), k (16x32), up (64x32)
        for level, lv in enumerate(space.levels[u]):
            if lv.sparse is None:
                continue
            weight, mask = stored_sparse(space, u, lv)
            got = space.quantized(u, level)
            assert torch.equal(got.codes, quantize_rtn(weight, q.grid(lv.bits)).codes)  # 0 is the zero point
            dense = got.dequantize(torch.float32)
            assert not dense[~mask].any() and lv.zeros == int((~mask).sum())  # pruned weights stay exact zeros
            assert torch.equal(q.decode(u, lv.key), dense)  # what the search applies
            parts = encode(got, mask)
            assert sum(t.numel() * t.element_size() for t in parts.values()) == lv.cost == sparse_packed_bytes(
                mask.numel() - lv.zeros, lv.bits, q.shapes[u], q.grid(lv.bits))
            back, back_mask = decode(parts, lv.bits, q.group_size)
            assert torch.equal(back.codes, got.codes) and torch.equal(back_mask, mask)
            assert torch.equal(back.scales, got.scales) and torch.equal(back.zeros, got.zeros)


def test_labels_are_readable_and_round_trip_through_text(built):
    numel = 1000
    levels = [LayerLevel(0, 2, 10), LayerLevel(3, 3, 11, 0, 500), LayerLevel(4, 3, 12, 1, 504), LayerLevel(1, 3, 13)]
    assert labels(levels, numel) == [2, "50.0%@3", "50.4%@3", 3]
    space = joint(built, 2.5)
    rng = np.random.default_rng(3)
    config = tuple(int(rng.integers(0, n)) for n in space.problem.num_levels)  # any levels, budget aside
    text = LABELLED.write(space, config)
    assert "model.layers.0.self_attn.q_proj: " in text and "%@" in text
    assert LABELLED.read(text, space, "config.txt") == config


@settings(max_examples=10, deadline=None)
@given(target=st.floats(1.4, 4.6), seed=st.integers(0, 10_000))
def test_every_mutation_stays_in_the_byte_window(built, target, seed):
    assert_mutations_stay_in_the_byte_window(joint(built, target), seed)


def test_rules_bound_by_bytes(built):
    space = joint(built, 2.8, rules=[{"match": "re:.*down_proj", "min": 3}])
    base, p, rng = space.model_space, space.problem, np.random.default_rng(0)
    parent = space.random_config(rng)
    for child in [parent] + offspring(parent, p, rng, 8, 3):
        levels = space.to_model_levels(child)
        for u, name in enumerate(base.units[: base.layers]):
            if name.endswith("down_proj"):  # at least the bytes of 3 bits, pruned or not
                assert base.levels[u][levels[u]].cost >= packed_bytes(3, base.quant.shapes[u], base.quant.grid(3))


def test_prefix_reuse_equals_full_forward(built):
    space = joint(built, 2.6)
    assert_random_and_mutants_reuse_exactly(space, built[2], 4, 3)


def test_mismatched_databases_are_refused(built, tmp_path):
    _, dense, pool, qdb, sdb = built
    other = tiny_model(layers=4, seed=5)
    tiny_sparsity_database(tmp_path / "other", other, pool)
    with pytest.raises(UserError, match=r"^--with-sparsity .*other: database .* built for another model"):
        joint(built, 3.0, with_sparsity=str(tmp_path / "other"))
    with pytest.raises(UserError, match=r"^--with-sparsity .*missing: no database"):
        joint(built, 3.0, with_sparsity=str(tmp_path / "missing"))
    with pytest.raises(UserError, match="built for space 'quant', not 'sparsity'"):
        joint(built, 3.0, with_sparsity=str(qdb))
    shutil.copytree(sdb, tmp_path / "bent")
    manifest = json.loads((tmp_path / "bent" / "manifest.json").read_text())
    manifest["layers"]["model.layers.0.self_attn.k_proj"]["shape"] = [32, 16]
    (tmp_path / "bent" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"k_proj is \[32, 16\] there but \[16, 32\] in quant database"):
        joint(built, 3.0, with_sparsity=str(tmp_path / "bent"))


def test_export_reloads_to_the_searched_model(built, tmp_path):
    model = copy.deepcopy(built[0])  # the export removes blocks from the model
    model.load_state_dict(built[1])
    space = joint(built, 2.5, model=model)
    masks = [(False, False), (True, True), (False, True), (True, False)]
    rng = np.random.default_rng(1)
    levels = tuple(int(rng.integers(0, n)) for n in space.problem.num_levels[: space.layers])
    config = space.compose(levels, masks)
    sparse = [u for u in space.kept_layers(config) if space.levels[u][config[u]].sparse is not None]
    assert len(sparse) > 3
    ids, expected = logits_under(space, config)
    summary = export(space, config, tmp_path, SimpleNamespace(save_pretrained=lambda out: None))
    reloaded = load_compressed(tmp_path)
    assert reloaded.config.num_hidden_layers == 3
    assert torch.equal(reloaded(ids).logits, expected)
    profile = json.loads((tmp_path / "evopress_profile.json").read_text())[SPARSITY]
    assert summary["sparse_layers"] == len(profile["layers"]) == len(sparse)
    extra = sum(packed_bytes(space.levels[u][config[u]].bits, space.quant.shapes[u],
                             space.quant.grid(space.levels[u][config[u]].bits)) - space.levels[u][config[u]].cost
                for u in sparse)
    assert summary["sparse_extra_bytes"] == profile["extra_bytes"] == extra > 0
    for u in (u for u in sparse if space.unit_block[u] == 0):  # block 0 is kept: its names do not change
        o, i = space.quant.shapes[u]
        assert profile["layers"][space.units[u]]["sparsity"] == space.levels[u][config[u]].zeros / (o * i)


def test_cli_search_with_sparsity_and_a_bad_path(tiny_checkpoint, tmp_path, capsys):
    from evopress.cli import main

    model, text = tiny_checkpoint
    common = ["--model", str(model), "--data", str(text), "--seq-len", "32", "--calib-tokens", "512", "--quiet"]
    qdb, sdb = tmp_path / "q", tmp_path / "s"
    assert main(["build-db", "--space", "quant", "--bits", "2,3,4", "--out", str(qdb), *common]) == 0
    assert main(["build-db", "--space", "sparsity", "--levels", "3", "--step", "24", "--out", str(sdb), *common]) == 0
    run = ["--space", "joint", "--db", str(qdb), "--byte-tolerance", str(TOL), "--final-tokens", "64", *common]
    search = ["search", "--target", "2.6", "--generations", "2", "--offspring", "4", "--stages", "1:32",
              "--initial-candidates", "2", "--initial-tokens", "32", "--track-every", "0", "--tokens", "64", *run]
    assert main([*search, "--with-sparsity", str(tmp_path / "nowhere"), "--out", str(tmp_path / "bad")]) == 2
    assert f"--with-sparsity {tmp_path / 'nowhere'}: no database" in capsys.readouterr().err
    assert main([*search, "--with-sparsity", str(sdb), "--out", str(tmp_path / "evo")]) == 0
    result = json.loads((tmp_path / "evo" / "result.json").read_text())
    budget = result["budget"]
    assert budget["lowest_bytes"] <= budget["bytes"] <= budget["budget_bytes"]
    assert budget["sparsity"]["database"] == str(sdb.resolve())
    assert result["space_options"]["with_sparsity"] == str(sdb.resolve())
    assert main(["export", str(tmp_path / "evo"), "--out", str(tmp_path / "export"), "--quiet"]) == 0
    assert (tmp_path / "export" / "model.safetensors").is_file()
