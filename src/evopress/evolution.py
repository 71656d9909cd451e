"""The (1+λ) evolutionary algorithm with level-switch mutation and multi-step selection.

Generic over any ``Problem``: it never looks inside a configuration beyond levels, costs and switch
groups. Fitness comes from an ``Evaluator`` that draws token samples and scores candidates on them
(lower is better). All randomness flows from one numpy Generator whose state is part of the
checkpointable ``SearchState``, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from .spaces.problem import Config, NoMoveError, Problem, switch


class Evaluator(Protocol):
    def sample(self, tokens: int, rng: np.random.Generator) -> Any: ...

    def score(self, configs: Sequence[Config], sample: Any) -> list[float]: ...

    def sample_tokens(self, sample: Any) -> int: ...


@dataclass
class SearchConfig:
    generations: int = 40
    offspring: int = 16
    stages: list[tuple[int, int]] = field(default_factory=lambda: [(2, 256), (1, 1024)])  # (survivors, tokens)
    max_switches: int = 3  # switches per child: min(U1, U2), U ~ Uniform{1..max_switches}
    initial_candidates: int = 16
    initial_tokens: int = 512
    seed: int = 0

    def validate(self) -> None:
        from .errors import UserError

        if self.generations < 0 or self.offspring < 1 or self.max_switches < 1:
            raise UserError("--generations must be >= 0, --offspring and --max-switches >= 1")
        if not self.stages or any(s < 1 or t < 1 for s, t in self.stages):
            raise UserError("--stages needs at least one 'survivors:tokens' pair of positive integers")
        if self.stages[-1][0] != 1:
            raise UserError("the last selection stage must keep exactly 1 survivor, the next parent")
        if any(b[0] > a[0] for a, b in zip(self.stages, self.stages[1:])):
            raise UserError("survivor counts in --stages must not grow from stage to stage")


@dataclass
class GenerationLog:
    generation: int
    fitness: float  # the new parent's fitness on the last stage's sample
    evaluations: int  # candidate evaluations this generation
    tokens: int  # candidate-tokens evaluated this generation
    seconds: float
    parent: Config
    children: int | None = None  # offspring actually drawn: fewer than asked when mutation found no more
    track: float | None = None  # the parent's fitness on the fixed held-aside sample, every few generations


@dataclass
class SearchState:
    """Everything needed to continue a search: checkpoint it after every generation."""

    parent: Config
    fitness: float | None
    generation: int  # completed generations
    rng_state: dict
    history: list[GenerationLog] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> "SearchState":
        history = [GenerationLog(**{**h, "parent": tuple(h["parent"])}) for h in d["history"]]
        return SearchState(tuple(d["parent"]), d["fitness"], d["generation"], d["rng_state"], history)


def num_switches(rng: np.random.Generator, max_switches: int) -> int:
    return int(min(rng.integers(1, max_switches + 1), rng.integers(1, max_switches + 1)))


def mutate(parent: Config, problem: Problem, rng: np.random.Generator, max_switches: int) -> Config:
    child = list(parent)
    for _ in range(num_switches(rng, max_switches)):
        switch(child, problem, rng)
    return tuple(child)


def offspring(parent: Config, problem: Problem, rng: np.random.Generator, n: int, max_switches: int,
              max_tries: int = 200) -> list[Config]:
    """Up to ``n`` distinct feasible children, none equal to the parent (rejection sampling, capped)."""
    children: dict[Config, None] = {}
    for _ in range(max_tries * n):
        child = mutate(parent, problem, rng, max_switches)
        if child != parent and child not in children and problem.feasible(child):
            children[child] = None
            if len(children) == n:
                break
    if not children:
        raise NoMoveError("mutation produced no feasible child different from the parent")
    return list(children)


def select(candidates: list[Config], parent: Config | None, stages: list[tuple[int, int]],
           evaluator: Evaluator, rng: np.random.Generator) -> tuple[Config, float, int, int]:
    """Multi-step selection; the parent joins only the last (largest) stage.

    Every stage draws a fresh sample shared by all its candidates (common random numbers). Returns
    the winner, its fitness, and the evaluations and candidate-tokens spent.
    """
    evaluations = tokens = 0
    scores: list[float] = []
    for s, (survivors, stage_tokens) in enumerate(stages):
        sample = evaluator.sample(stage_tokens, rng)
        if s == len(stages) - 1 and parent is not None:
            candidates = candidates + [parent]
        scores = evaluator.score(candidates, sample)
        evaluations += len(candidates)
        tokens += len(candidates) * evaluator.sample_tokens(sample)
        order = sorted(range(len(candidates)), key=lambda i: scores[i])[:survivors]
        candidates, scores = [candidates[i] for i in order], [scores[i] for i in order]
    return candidates[0], scores[0], evaluations, tokens


def initialize(initial: list[Config], config: SearchConfig, evaluator: Evaluator,
               rng: np.random.Generator) -> SearchState:
    """One starting point is taken as is; several are ranked on ``initial_tokens`` tokens."""
    start = time.perf_counter()
    if len(initial) == 1:
        return SearchState(initial[0], None, 0, rng.bit_generator.state)
    best, fitness, evals, tokens = select(list(initial), None, [(1, config.initial_tokens)], evaluator, rng)
    log = GenerationLog(0, fitness, evals, tokens, time.perf_counter() - start, best)
    return SearchState(best, fitness, 0, rng.bit_generator.state, [log])


def evolve(problem: Problem, evaluator: Evaluator, initial: list[Config], config: SearchConfig,
           state: SearchState | None = None,
           on_generation: Callable[[SearchState], None] | None = None) -> SearchState:
    """Run the search to ``config.generations``; pass a checkpointed ``state`` to resume."""
    config.validate()
    bad = [c for c in initial if not problem.feasible(c)]
    if bad:
        raise ValueError(f"initial configuration violates the budget: {bad[0]}")
    rng = np.random.default_rng(config.seed)
    if state is None:
        state = initialize(initial, config, evaluator, rng)
        if on_generation:
            on_generation(state)
    else:
        rng.bit_generator.state = state.rng_state
    while state.generation < config.generations:
        start = time.perf_counter()
        children = offspring(state.parent, problem, rng, config.offspring, config.max_switches)
        parent, fitness, evals, tokens = select(children, state.parent, config.stages, evaluator, rng)
        state.generation += 1
        state.parent, state.fitness = parent, fitness
        state.rng_state = rng.bit_generator.state
        state.history.append(GenerationLog(state.generation, fitness, evals, tokens,
                                           time.perf_counter() - start, parent, len(children)))
        if on_generation:
            on_generation(state)
    return state
