"""Joint space: byte budget window under unequal costs, dropping as the depth space does, export round trip."""

import copy
import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evopress.compressors.gptq import QuantGrid
from evopress.errors import UserError
from evopress.evolution import offspring
from evopress.models import Decoder
from evopress.spaces import make_space
from evopress.spaces.plugin import BaselineInputs
from evopress.spaces.problem import Problem, settle, switch
from evopress.spaces.drop.space import DropSpace
from evopress.spaces.joint import baselines
from evopress.spaces.joint.export import export
from evopress.spaces.joint.space import JointSpace
from evopress import load_compressed
from evopress.spaces.quant.export import to_compressed_tensors
from evopress.spaces.quant.levels import packed_bytes
from evopress.spaces.quant.space import QuantSpace

from .conftest import (
    assert_mutations_stay_in_the_byte_window, assert_random_and_mutants_reuse_exactly, logits_under,
    tiny_quant_database)

TOL = 0.03  # a 32-wide model's layer steps are ~1% of its bytes; real models use the 0.1% default


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A 4-block tiny Llama, its dense weights and a quant database at 2, 3, 4 bits (group 16)."""
    return tiny_quant_database(tmp_path_factory.mktemp("jdb"), 4, (2, 3, 4))[:4]


def joint(built, target, model=None, **options):
    """The joint space on the fixture's model (restored to dense), or on ``model``."""
    _, dense, _, root = built
    if model is None:
        model = built[0]
        model.load_state_dict(dense)
    return make_space("joint", Decoder(model), target, {"db": str(root), "tolerance": TOL, **options})


def test_packed_bytes_are_what_the_export_stores(built):
    space = joint(built, 3.0)
    q = space.quant
    for u in range(len(q.units)):
        for b in q.bits:
            stored = sum(t.numel() * t.element_size() for t in to_compressed_tensors(q.quantized(u, b)).values())
            assert packed_bytes(b, q.shapes[u], q.grid(b)) == stored
    assert packed_bytes(3, (70, 45), QuantGrid(3, -1)) == sum(  # per-channel, widths not multiples of 32
        t.numel() * t.element_size() for t in to_compressed_tensors(SimpleNamespace(
            codes=torch.zeros(70, 45, dtype=torch.uint8), scales=torch.zeros(70, 1, dtype=torch.float16),
            zeros=torch.zeros(70, 1, dtype=torch.uint8), grid=QuantGrid(3, -1), shape=(70, 45))).values())


@settings(max_examples=15, deadline=None)
@given(target=st.floats(1.2, 4.6), seed=st.integers(0, 10_000))
def test_every_mutation_stays_in_the_byte_window(built, target, seed):
    assert_mutations_stay_in_the_byte_window(joint(built, target), seed)


def reachable(problem: Problem, config: list[int], units: range) -> tuple[int, int]:
    """The least and greatest cost ``settle`` can reach moving ``units`` (levels 0..2, costs ascending); a mask's
    controller and the units it switches off stay put."""
    movable = {u for u in units if u not in problem.controllers and problem.active(config, u)}
    return tuple(problem.cost([lv if u in movable else v for u, v in enumerate(config)]) for lv in (0, 2))


@settings(max_examples=90, deadline=None)
@given(data=st.data())
def test_masked_cost_delta_and_settle(data):
    """Problem arithmetic with masks: ``delta`` is the cost difference. ``settle`` lands in the window when its
    units can reach it by steps no wider than the window (it cannot jump over it), never when they cannot reach
    it; with coarser steps it may miss, but never lands outside."""
    n = data.draw(st.integers(3, 8))
    costs = tuple(tuple(sorted(data.draw(st.lists(st.integers(1, 50), min_size=3, max_size=3)))) for _ in range(n))
    members = tuple(range(data.draw(st.integers(1, n - 1))))
    config = data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)) + [data.draw(st.integers(0, 1))]
    problem = Problem((3,) * n + (2,), costs + ((0, 0),), 0, (tuple(range(n + 1)),), masks=((n, 1, members),))
    plain = sum(costs[u][config[u]] for u in range(n) if not (config[n] and u in members))
    assert problem.cost(config) == plain
    for u in range(n + 1):
        for lv in range(problem.num_levels[u]):
            moved = config[:u] + [lv] + config[u + 1:]
            assert problem.delta(config, u, lv) == problem.cost(moved) - problem.cost(config)
    units = range(n + 1)
    low, high = reachable(problem, config, units)
    case = data.draw(st.sampled_from(["must land", "cannot land", "may land"]))
    if case == "must land":  # a window the units reach, at least as wide as their widest step
        slack = max(0, max(c[2] - c[0] for c in costs) - 1) + data.draw(st.integers(0, 10))
        budget = data.draw(st.integers(low, high + slack))
    elif case == "cannot land":  # a window wholly below or above what the units reach
        slack = data.draw(st.integers(0, 20))
        budget = data.draw(st.sampled_from([low - 1 - data.draw(st.integers(0, 30)),
                                            high + slack + 1 + data.draw(st.integers(0, 30))]))
    else:
        slack, budget = data.draw(st.integers(0, 20)), data.draw(st.integers(10, 150))
    problem = replace(problem, budget=budget, slack=slack)
    before = list(config)
    landed = settle(config, problem, np.random.default_rng(data.draw(st.integers(0, 99))), units)
    assert landed == problem.feasible(config)
    if case != "may land":
        assert landed is (case == "must land")
    assert config[n] == before[n]  # repairs never switch a mask
    assert all(config[m] == before[m] for m in members) or not before[n]  # masked units never move


def test_exact_problems_keep_the_paper_switch():
    problem = Problem((2,) * 6, ((0, 1),) * 6, 3, (tuple(range(6)),))
    config = [1, 1, 1, 0, 0, 0]
    for seed in range(20):
        c = list(config)
        switch(c, problem, np.random.default_rng(seed))
        assert sum(c) == 3 and c != config


def test_dropped_sub_block_computes_what_the_depth_space_computes(built):
    space = joint(built, 2.0)
    masks = [(True, False), (False, True), (True, True), (False, False)]
    levels = tuple(np.random.default_rng(0).integers(0, 3, space.layers))
    config = space.compose(levels, masks)
    ids, got = logits_under(space, config)
    space.apply(None)
    model, _, _, root = built
    quant, depth = QuantSpace(space.decoder, None, db=str(root)), DropSpace(space.decoder, None)
    quant.apply(levels)
    depth.apply(depth.config_from_masks(masks))
    assert torch.equal(model(ids).logits, got)
    quant.apply(None)
    depth.apply(None)


def test_export_reloads_to_the_searched_model(built, tmp_path):
    model = copy.deepcopy(built[0])  # the export removes blocks from the model
    model.load_state_dict(built[1])
    space = joint(built, 2.0, model=model)
    masks = [(False, False), (True, True), (False, True), (True, False)]
    levels = tuple(np.random.default_rng(1).integers(0, 3, space.layers))
    config = space.compose(levels, masks)
    ids, expected = logits_under(space, config)
    summary = export(space, config, tmp_path, SimpleNamespace(save_pretrained=lambda out: None))
    reloaded = load_compressed(tmp_path)
    assert reloaded.config.num_hidden_layers == 3 and summary["removed_blocks"] == [1]
    assert torch.equal(reloaded(ids).logits, expected)
    profile = json.loads((tmp_path / "evopress_profile.json").read_text())
    assert profile["evopress_dropped"] == {"attention": [2], "mlp": [1]}  # indices of the 3 exported blocks
    assert summary["searched_bytes"] == space.size_bytes(config) < summary["weights_bytes"]


def test_rules_pin_and_tie_apply(built):
    rules = [{"match": "re:.*layers\\.0\\.(self_attn|mlp)", "pin": "keep"},
             {"match": "re:.*self_attn\\.[qkv]_proj", "tie": True},
             {"match": "re:.*down_proj", "min": 3}]
    space = joint(built, 2.4, rules=rules)
    p, rng = space.problem, np.random.default_rng(0)
    parent = space.random_config(rng)
    for child in [parent] + offspring(parent, p, rng, 12, 3):
        assert p.feasible(child)
        levels = space.to_model_levels(child)
        base = space.model_space
        assert p.cost(child) == base.problem.cost(levels) == space.size_bytes(child)
        assert base.dropped(levels)[0] == (False, False)
        bits = {n: base.quant.bits[lv] for n, lv in zip(base.units, levels)}
        assert all(b >= 3 for n, b in bits.items() if n.endswith("down_proj"))
        assert len({bits[f"model.layers.2.self_attn.{x}_proj"] for x in "qkv"}) == 1
    with pytest.raises(UserError, match="tie joins"):
        joint(built, 3.0, rules=[{"match": "re:.*layers\\.1\\..*_proj", "tie": True}])


def test_baselines_fit_the_bytes(built):
    space = joint(built, 3.5)  # group 16: 2 bits are 3.125 with scales and zero points, 4 bits 5.25
    assert isinstance(space, JointSpace)

    class Scorer:  # fewer dropped blocks, lower KL: enough to check the grid picks by score
        def sample(self, tokens, rng):
            return None

        def score(self, configs, sample):
            return [float(len(space.budget_report(c)["removed_blocks"])) for c in configs]

    inputs = BaselineInputs(space, Scorer(), built[2], tokens=64, seed=0)
    uniform = baselines.uniform(inputs)
    depth = baselines.depth(inputs)
    grid = baselines.grid(inputs)
    for config in (uniform, depth, grid):
        assert space.problem.cost(config) <= space.problem.budget
    assert set(uniform[: space.layers]) == {0} and not space.budget_report(uniform)["removed_blocks"]
    assert set(depth[: space.layers]) == {2} and space.budget_report(depth)["removed_blocks"]
    assert not space.budget_report(grid)["removed_blocks"]  # the scorer prefers no drops: uniform 2 bits


class FewerDrops:
    """A scorer preferring fewer dropped blocks: enough for the grid baseline to pick by score."""

    def __init__(self, space):
        self.space = space

    def sample(self, tokens, rng):
        return None

    def score(self, configs, sample):
        return [float(len(self.space.budget_report(c)["removed_blocks"])) for c in configs]


def _warm_start(built, space, init_from, **options):
    """``pipeline.warm_start`` on ``space`` with the ``FewerDrops`` scorer: (configurations, log lines)."""
    from evopress import pipeline
    from evopress.recipe import make_recipe

    recipe = make_recipe(space="joint", target=space.target, init_from=init_from, baseline_tokens=64,
                         space_options={"db": str(built[3]), "tolerance": TOL, **options})
    ctx = SimpleNamespace(recipe=recipe, space=space, evaluator=FewerDrops(space), pool=built[2],
                          baseline_runs={})
    logged = []
    return pipeline.warm_start(ctx, [], logged.append), logged


def test_the_warm_start_repairs_baselines_into_the_byte_window(built):
    """Uniform bitwidths and whole blocks land below the window; the warm start moves them into it."""
    space = joint(built, 3.5)
    p = space.problem
    inputs = BaselineInputs(space, FewerDrops(space), built[2], tokens=64, seed=0)
    grid, depth = baselines.grid(inputs), baselines.depth(inputs)
    assert all(p.cost(c) < p.budget - p.slack for c in (grid, depth))  # below the window: no candidates as they are
    configs, logged = _warm_start(built, space, ["grid", "depth"])
    assert len(configs) == 2 and all(p.feasible(c) for c in configs)
    assert space.dropped(configs[0]) == space.dropped(grid)  # bits moved up, nothing else
    after = {(b, k) for b, pair in enumerate(space.dropped(configs[1])) for k, off in enumerate(pair) if off}
    before = {(b, k) for b, pair in enumerate(space.dropped(depth)) for k, off in enumerate(pair) if off}
    assert after < before  # at the highest bitwidth only restoring a sub-block adds bytes
    assert sum("outside the search's budget" in line and "repaired" in line for line in logged) == 2
    assert _warm_start(built, space, ["grid", "depth"])[0] == configs  # a function of the seed


def test_a_baseline_the_repair_cannot_place_is_refused(built):
    space = joint(built, 3.5, tolerance=0.0)  # an exact byte count that no single-level moves hit
    with pytest.raises(UserError, match="--init-from uniform: its configuration costs .* no single-level moves"):
        _warm_start(built, space, ["uniform"], tolerance=0.0)


def test_size_bytes_of_quant_and_drop(built):
    model, dense, _, root = built
    model.load_state_dict(dense)
    decoder = Decoder(model)
    quant = QuantSpace(decoder, 3.0, db=str(root))
    config = (1,) * len(quant.units)
    assert quant.size_bytes(config) == sum(packed_bytes(3, s, quant.grid(3)) for s in quant.shapes)
    depth = DropSpace(decoder, 0.25)
    assert depth.dense_bytes() == quant.dense_bytes() == sum(4 * o * i for o, i in quant.shapes)
    dropped = depth.config_from_masks([(True, True)] + [(False, False)] * 3)
    assert depth.size_bytes(dropped) == depth.dense_bytes() * 3 // 4


def test_retarget_shares_the_composed_spaces_and_equals_a_fresh_space(built):
    """pareto's next budget: the same quant database and depth swaps, only the byte budget rebuilt."""
    model, dense, _, root = built
    model.load_state_dict(dense)
    decoder, options = Decoder(model), {"db": str(root), "tolerance": TOL}
    low = make_space("joint", decoder, 2.5, options)
    low.apply(low.random_config(np.random.default_rng(0)))
    low.apply(None)
    high = make_space("joint", decoder, 3.5, options, reuse=low)
    fresh = make_space("joint", decoder, 3.5, options)
    assert high.quant is low.quant and high.drop is low.drop and high.quant.db is low.quant.db
    assert high.problem == fresh.problem and (low.target, high.target) == (2.5, 3.5)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in dense.items())


def test_prefix_reuse_equals_full_forward(built):
    space = joint(built, 2.6)
    assert_random_and_mutants_reuse_exactly(space, built[2], 5, 4)


def test_cli_build_search_baselines_export(tiny_checkpoint, tmp_path):
    from evopress.cli import main

    model, text = tiny_checkpoint
    common = ["--model", str(model), "--data", str(text), "--seq-len", "32", "--calib-tokens", "512", "--quiet"]
    db = tmp_path / "db"
    assert main(["build-db", "--space", "quant", "--bits", "2,3,4", "--out", str(db), *common]) == 0
    run = ["--space", "joint", "--db", str(db), "--byte-tolerance", str(TOL), "--final-tokens", "128", *common]
    assert main(["search", "--target", "2.8", "--generations", "3", "--offspring", "4", "--stages", "2:32,1:64",
                 "--initial-candidates", "3", "--initial-tokens", "64", "--track-every", "0", "--tokens", "64",
                 "--out", str(tmp_path / "evo"), *run]) == 0
    result = json.loads((tmp_path / "evo" / "result.json").read_text())
    assert result["recipe"]["init_from"] == ["grid"]  # the space's default warm start, repaired into the window
    budget = result["budget"]
    assert budget["lowest_bytes"] <= budget["bytes"] <= budget["budget_bytes"]
    for method in ("uniform", "grid"):
        assert main(["baseline", "--method", method, "--target", "2.8", "--tokens", "64",
                     "--out", str(tmp_path / method), *run]) == 0
    uniform = json.loads((tmp_path / "uniform" / "result.json").read_text())["budget"]
    assert uniform["bytes"] < uniform["lowest_bytes"]  # below the window, as a uniform bitwidth lands
    # a baseline below the window is still a valid answer: eval reads it back (only above the budget is refused)
    assert main(["eval", str(tmp_path / "uniform"), "--eval-data", str(text), "--eval-tokens", "64",
                 "--eval-seq-len", "32", "--quiet"]) == 0
    assert (tmp_path / "uniform" / "eval.json").is_file()
    bytes_run = ["search", "--target", str(budget["budget_bytes"]), "--target-bytes", "--generations", "1",
                 "--offspring", "2", "--stages", "1:32", "--initial-candidates", "2", "--initial-tokens", "32",
                 "--track-every", "0", "--init-from", "none", "--out", str(tmp_path / "bytes"), *run]
    assert main(bytes_run) == 0
    same = json.loads((tmp_path / "bytes" / "result.json").read_text())["budget"]
    assert same["budget_bytes"] == budget["budget_bytes"]
    assert main(["export", str(tmp_path / "evo"), "--out", str(tmp_path / "export"), "--quiet"]) == 0
    assert (tmp_path / "export" / "model.safetensors").is_file()
