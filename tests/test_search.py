"""The generic EA on synthetic problems: budget exactness, selection, convergence, resume."""

import itertools
import json
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evopress.evolution import (NoMoveError, SearchConfig, SearchState, evolve, mutate, num_switches,
                             offspring, select)
from evopress.spaces.problem import Problem


@st.composite
def problems_and_configs(draw):
    """Groups of units whose level steps cost the same inside a group, and a feasible config."""
    groups, costs, num_levels, config = [], [], [], []
    u = 0
    for _ in range(draw(st.integers(1, 3))):
        size = draw(st.integers(2, 6))
        levels = draw(st.integers(2, 5))
        step = draw(st.integers(1, 7))
        groups.append(tuple(range(u, u + size)))
        for _ in range(size):
            num_levels.append(levels)
            costs.append(tuple(step * lv for lv in range(levels)))
            config.append(draw(st.integers(0, levels - 1)))
        u += size
    problem = Problem(tuple(num_levels), tuple(costs), 0, tuple(groups))
    budget = problem.cost(config)
    return Problem(tuple(num_levels), tuple(costs), budget, tuple(groups)), tuple(config)


def can_trade(problem: Problem, config: tuple[int, ...]) -> bool:
    """Whether a group holds one unit that can go a level up and another that can go a level down."""
    return any(u != v and config[u] < problem.num_levels[u] - 1 and config[v] > 0
               for group in problem.groups for u in group for v in group)


@settings(max_examples=200, deadline=None)
@given(problems_and_configs(), st.integers(0, 2**31 - 1))
def test_mutation_preserves_budget_and_group_sums(pc, seed):
    """A child keeps the budget and every group's level sum; ``NoMoveError`` exactly when no group can trade."""
    problem, config = pc
    rng = np.random.default_rng(seed)
    if not can_trade(problem, config):  # every group all at its lowest or all at its highest level
        with pytest.raises(NoMoveError):
            mutate(config, problem, rng, 3)
        return
    child = mutate(config, problem, rng, 3)
    assert problem.feasible(child)
    assert problem.cost(child) == problem.budget
    for group in problem.groups:
        assert sum(child[u] for u in group) == sum(config[u] for u in group)


def test_number_of_switches_follows_min_of_two_uniforms():
    rng = np.random.default_rng(0)
    counts = Counter(num_switches(rng, 3) for _ in range(30000))
    for s, p in {1: 5 / 9, 2: 3 / 9, 3: 1 / 9}.items():
        assert abs(counts[s] / 30000 - p) < 0.015


def drop_problem(n: int, k: int) -> tuple[Problem, tuple[int, ...]]:
    problem = Problem((2,) * n, ((0, 1),) * n, k, (tuple(range(n)),))
    return problem, tuple([1] * k + [0] * (n - k))


def test_offspring_are_distinct_feasible_and_differ_from_parent():
    problem, parent = drop_problem(10, 3)
    children = offspring(parent, problem, np.random.default_rng(0), 20, 3)
    assert len(children) == 20 == len(set(children))
    assert parent not in children
    assert all(problem.feasible(c) for c in children)


def test_no_feasible_move_raises_instead_of_hanging():
    problem, parent = drop_problem(4, 4)
    with pytest.raises(NoMoveError):
        offspring(parent, problem, np.random.default_rng(0), 4, 3)


class FakeEvaluator:
    """Fitness ``f``, plus ``noise`` that depends on the sample; records every stage's candidates and sample.

    Like the real ``Evaluator.sample`` it draws windows from the search's rng, so the search's random
    stream interleaves mutation and sample draws: a resume that restores the rng at another point, or a
    stage that reuses a sample, changes what the search sees.
    """

    WINDOWS = 64

    def __init__(self, f, noise: float = 0.0, spread: float = 0.0):
        """``spread``: the standard error the evaluator claims for every paired difference."""
        self.f, self.sample_noise, self.spread = f, noise, spread
        self.stages: list[list] = []
        self.samples: list[tuple[int, tuple[int, ...]]] = []
        self.evaluations = 0

    def sample(self, tokens, rng):
        return tokens, tuple(int(w) for w in rng.permutation(self.WINDOWS)[:8])

    def sample_tokens(self, sample):
        return sample[0]

    def score(self, configs, sample):
        self.stages.append(list(configs))
        self.samples.append(sample)
        self.evaluations += len(configs)
        return [self.f(c) + self.sample_noise * np.random.default_rng([*sample[1], *c]).random() for c in configs]

    def noise(self, a, b):
        return self.spread


def test_selection_keeps_the_best_and_parent_joins_only_last_stage():
    candidates = [(i,) for i in range(10)]
    parent = (100,)
    ev = FakeEvaluator(lambda c: abs(c[0] - 6))
    s = select(candidates, parent, [(4, 8), (2, 16), (1, 32)], ev, np.random.default_rng(0))
    assert s.winner == (6,) and s.fitness == 0 and s.best_child == 0
    assert parent not in ev.stages[0] and parent not in ev.stages[1] and parent in ev.stages[2]
    assert [len(s) for s in ev.stages] == [10, 4, 3]
    assert s.evaluations == 17 and s.tokens == 10 * 8 + 4 * 16 + 3 * 32
    # an unbeatable parent survives the final stage
    ev = FakeEvaluator(lambda c: -1 if c == parent else abs(c[0] - 6))
    assert select(candidates, parent, [(4, 8), (1, 32)], ev, np.random.default_rng(0)).winner == parent


@pytest.mark.parametrize("margin, replaced", [(0.05, False), (0.2, True)])
def test_a_child_replaces_its_parent_only_when_better_by_more_than_the_noise(margin, replaced):
    """The stage's standard error is 0.1: at 1 sigma a child better by 0.05 is noise, one better by 0.2 is not."""
    parent, child = (0,), (1,)
    ev = FakeEvaluator(lambda c: 1.0 - margin * (c == child), spread=0.1)
    s = select([child], parent, [(1, 32)], ev, np.random.default_rng(0), sigmas=1.0)
    assert s.winner == (child if replaced else parent)
    assert s.fitness == pytest.approx(1.0 - margin * replaced) and s.best_child == pytest.approx(1.0 - margin)
    assert s.noise == 0.1
    # the paper's rule (0 sigmas) takes any improvement
    assert select([child], parent, [(1, 32)], ev, np.random.default_rng(0), sigmas=0.0).winner == child


def test_the_initial_ranking_keeps_the_candidates_it_cannot_tell_from_its_winner():
    ev = FakeEvaluator(lambda c: c[0] / 10, spread=0.15)  # 0.0, 0.1, 0.2, 0.3: 0.1 is within the noise
    s = select([(2,), (0,), (3,), (1,)], None, [(1, 32)], ev, np.random.default_rng(0), sigmas=1.0)
    assert s.winner == (0,) and s.tied == [(0,), (1,)]


def brute_force(problem: Problem, f):
    n, k = len(problem.num_levels), problem.budget
    best = None
    for idx in itertools.combinations(range(n), k):
        c = tuple(int(i in idx) for i in range(n))
        if best is None or f(c) < f(best):
            best = c
    return best


@pytest.mark.parametrize("kind", ["separable", "non_separable"])
def test_ea_finds_the_optimum(kind):
    n, k = 14, 5
    problem, _ = drop_problem(n, k)
    w = np.random.default_rng(3).normal(size=n)
    pair = np.random.default_rng(4).normal(size=(n, n))
    if kind == "separable":
        def f(c):
            return float(np.dot(w, c))
    else:
        # pairwise interactions: the value of dropping a unit depends on what else is dropped
        def f(c):
            x = np.array(c, dtype=float)
            return float(x @ pair @ x + 0.5 * np.dot(w, x))
    optimum = brute_force(problem, f)
    rng = np.random.default_rng(0)
    initial = [tuple(int(i in s) for i in range(n)) for s in
               (rng.choice(n, size=k, replace=False) for _ in range(8))]
    config = SearchConfig(generations=150, offspring=8, stages=[(2, 1), (1, 1)], initial_candidates=8, seed=0)
    state = evolve(problem, FakeEvaluator(f), initial, config)
    assert f(state.parent) == pytest.approx(f(optimum))


def test_resume_gives_the_same_result_as_an_uninterrupted_run():
    """Noisy fitness: which child wins depends on the samples, so every draw after the checkpoint must match."""
    n, k = 12, 4
    problem, start = drop_problem(n, k)
    w = np.random.default_rng(5).normal(size=(n, n))
    f = lambda c: float(np.array(c) @ w @ np.array(c))  # noqa: E731
    run = lambda generations, **kw: evolve(  # noqa: E731
        problem, FakeEvaluator(f, noise=2.0), [start], SearchConfig(generations=generations, offspring=6, seed=7), **kw)
    full = run(10)
    saved: list[dict] = []
    run(4, on_generation=lambda s: saved.append(json.loads(json.dumps(s.to_json()))))
    resumed = run(10, state=SearchState.from_json(saved[-1]))
    assert resumed.parent == full.parent
    assert [h.parent for h in resumed.history] == [h.parent for h in full.history]
    assert [h.fitness for h in resumed.history] == [h.fitness for h in full.history]


def test_every_stage_of_every_generation_draws_a_fresh_sample():
    problem = Problem((2,) * 8, ((0, 1),) * 8, 3, (tuple(range(8)),))
    ev = FakeEvaluator(lambda c: sum(i * x for i, x in enumerate(c)))
    config = SearchConfig(generations=5, offspring=4, stages=[(2, 8), (1, 16)], initial_candidates=1)
    evolve(problem, ev, [(1, 1, 1, 0, 0, 0, 0, 0)], config)
    assert len(ev.samples) == 10 and [t for t, _ in ev.samples] == [8, 16] * 5
    assert len({windows for _, windows in ev.samples}) == 10


def test_convergence_verdict_reads_the_fixed_sample_track():
    from evopress.report import convergence

    def run(track):
        history = [{"generation": g, "fitness": 1.0, "track": t} for g, t in enumerate(track)]
        return {"method": "evopress", "target": 0.25, "fitness": {"metric": "kl"}, "history": history}

    assert "still improving" in convergence(run([1.0, None, 0.9, None, 0.8, None, 0.7, None, 0.6]))
    assert "flat" in convergence(run([1.0, None, 0.7, None, 0.6, None, 0.6, None, 0.599]))
    assert convergence(run([None, None, 0.5])) is None  # one point says nothing


def test_the_report_says_when_fitness_values_are_ratios():
    from evopress.report import fitness_name

    run = {"fitness": {"metric": "kl"}, "recipe": {"fitness": {"aggregate": "sources"}}}
    assert fitness_name(run) == "kl"  # one source: plain KL
    mixed = {**run, "reference_sources": {"wiki": 1.0, "ptb": 1.1}}
    assert fitness_name(mixed) == "kl ratio to the initial winner (mean over sources)"
    assert fitness_name({**mixed, "recipe": {"fitness": {"aggregate": "tokens"}}}) == "kl"
