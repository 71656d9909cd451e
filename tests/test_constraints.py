"""Pins, bounds and ties hold through initialisation, mutation and the search; the budget stays exact."""

import numpy as np
import pytest

from evopress.errors import UserError
from evopress.evolution import SearchConfig, evolve, mutate
from evopress.models import Decoder
from evopress.spaces import make_space

from .conftest import tiny_model
from .test_search import FakeEvaluator

RULES = [
    {"match": "re:model\\.layers\\.0\\..*", "pin": 0},  # never drop anything in block 0
    {"match": "re:model\\.layers\\.(\\d+)\\.(self_attn|mlp)", "tie": True},  # whole blocks only
    {"match": "model.layers.5.mlp", "min": 1},  # block 5 must go
]


def constrained(rules=RULES, target=0.34, layers=6):
    return make_space("drop", Decoder(tiny_model(layers=layers)), target, {"granularity": "sublayer", "rules": rules})


def check(space, config):
    levels = space.to_model_levels(config)
    L = space.num_blocks
    attn, mlp = levels[:L], levels[L:]
    assert attn == mlp  # tied
    assert attn[0] == 0 and attn[5] == 1
    assert sum(attn) == space.base.k  # exact budget in the original space's terms
    assert space.base.problem.feasible(levels)


def test_rules_hold_for_initial_configs_and_every_mutation():
    space = constrained()
    assert len(space.units) == 6 and space.problem.num_levels[0] == 1  # pinned: one level only
    rng = np.random.default_rng(0)
    for config in space.initial_configs(rng, 8):
        check(space, config)
        for _ in range(50):
            config = mutate(config, space.problem, rng, 3)
            check(space, config)


def test_search_respects_rules_and_round_trips_model_levels():
    space = constrained()
    rng = np.random.default_rng(1)
    w = rng.normal(size=len(space.units))
    state = evolve(space.problem, FakeEvaluator(lambda c: float(np.dot(w, c))), space.initial_configs(rng, 4),
                   SearchConfig(generations=20, offspring=4, stages=[(1, 1)], seed=0))
    check(space, state.parent)
    assert space.from_model_levels(space.to_model_levels(state.parent)) == state.parent
    broken = list(space.to_model_levels(state.parent))
    broken[0], broken[1] = 1, 0  # drop block 0's attention: breaks the pin and the tie
    with pytest.raises(UserError, match="break the rules"):
        space.from_model_levels(tuple(broken))


@pytest.mark.parametrize("rules, message", [
    ([{"match": "re:(", "pin": 0}], "bad regex"),
    ([{"match": "model.layers.1.mlp", "pin": 3}], "not one of"),
    ([{"match": "model.layers.1.mlp", "min": 1, "max": 0}], "no level"),
    ([{"match": "re:.*", "pin": 0}], "impossible"),
    ([{"match": "x", "colour": "red"}], "bad rule"),
])
def test_bad_rules_are_clear_errors(rules, message):
    with pytest.raises(UserError, match=message):
        constrained(rules)
