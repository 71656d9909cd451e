"""The (1+λ) evolutionary algorithm with level-switch mutation and multi-step selection.

Generic over any ``Problem``: it never looks inside a configuration beyond levels, costs and switch
groups. Fitness comes from an ``Evaluator`` that draws token samples and scores candidates on them
(lower is better), and says how much of the difference between two scores on one sample is noise.

Noise-aware acceptance: the last stage's sample is small, and a child that only met easier windows
would replace a better parent. A child replaces its parent only when better by more than
``accept_sigmas`` standard errors of their paired difference on that sample; the same rule keeps as
``contenders`` the initial candidates the initial ranking could not tell from its winner. All randomness
flows from one numpy Generator whose state is part of the
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

    def score(self, configs: Sequence[Config], sample: Any) -> Sequence[Any]:
        """One score per configuration, each ordered by and convertible to its float fitness."""

    def noise(self, a: Any, b: Any) -> float:
        """The standard error of ``float(a) - float(b)`` for two scores on the same sample."""

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
    accept_sigmas: float = 1.0  # a child must beat its parent by this many standard errors (0: any margin)

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
        if not self.accept_sigmas >= 0:
            raise UserError(f"--accept-sigmas must be >= 0, not {self.accept_sigmas}")


@dataclass
class GenerationLog:
    generation: int
    fitness: float  # the new parent's fitness on the last stage's sample (generation 0: the initial
    # ranking's, before a per-source aggregate has its reference)
    evaluations: int  # candidate evaluations this generation
    tokens: int  # candidate-tokens evaluated this generation
    seconds: float
    parent: Config
    children: int | None = None  # offspring actually drawn: fewer than asked when mutation found no more
    track: float | None = None  # the parent's fitness on the fixed held-aside sample, every few generations
    track_sources: dict[str, float] | None = None  # the parent's KL per calibration source on that sample
    best_child: float | None = None  # the best child's fitness on the last stage's sample
    noise: float | None = None  # the standard error of best child - parent on that sample


@dataclass
class SearchState:
    """Everything needed to continue a search: checkpoint it after every generation."""

    parent: Config
    fitness: float | None
    generation: int  # completed generations
    rng_state: dict
    history: list[GenerationLog] = field(default_factory=list)
    contenders: list[Config] = field(default_factory=list)  # the initial winner, then those tied with it

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> "SearchState":
        history = [GenerationLog(**{**h, "parent": tuple(h["parent"])}) for h in d["history"]]
        # a checkpoint from before contenders were kept: its initial winner alone
        first = history[0].parent if history and history[0].generation == 0 else tuple(d["parent"])
        contenders = [tuple(c) for c in d["contenders"]] if "contenders" in d else [first]
        return SearchState(tuple(d["parent"]), d["fitness"], d["generation"], d["rng_state"], history, contenders)


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


@dataclass
class Selection:
    """What one multi-step selection found."""

    winner: Config
    fitness: float
    evaluations: int
    tokens: int  # candidate-tokens
    best_child: float | None = None  # with a parent: the best child's fitness in the last stage
    noise: float | None = None  # and the standard error of its difference to the parent
    tied: list[Config] = field(default_factory=list)  # without a parent: the winner, then those within the noise


def select(candidates: list[Config], parent: Config | None, stages: list[tuple[int, int]],
           evaluator: Evaluator, rng: np.random.Generator, sigmas: float = 0.0) -> Selection:
    """Multi-step selection; the parent joins only the last (largest) stage.

    Every stage draws a fresh sample shared by all its candidates (common random numbers). In the last
    stage the best child replaces the parent only when better by more than ``sigmas`` standard errors
    of their paired difference.
    """
    evaluations = tokens = 0
    for s, (survivors, stage_tokens) in enumerate(stages):
        sample = evaluator.sample(stage_tokens, rng)
        last = s == len(stages) - 1
        scores = evaluator.score(candidates + [parent] if last and parent is not None else candidates, sample)
        evaluations += len(scores)
        tokens += len(scores) * evaluator.sample_tokens(sample)
        order = sorted(range(len(candidates)), key=lambda i: float(scores[i]))
        if last:
            best = scores[order[0]]
            if parent is None:
                tied = [candidates[i] for i in order if float(scores[i]) - sigmas * evaluator.noise(scores[i], best)
                        <= float(best)]
                return Selection(candidates[order[0]], float(best), evaluations, tokens, tied=tied)
            noise = evaluator.noise(best, scores[-1])
            kept = float(best) + sigmas * noise > float(scores[-1])
            winner, fitness = (parent, scores[-1]) if kept else (candidates[order[0]], best)
            return Selection(winner, float(fitness), evaluations, tokens, float(best), noise)
        candidates = [candidates[i] for i in order[:survivors]]
    raise AssertionError("unreachable: stages is never empty (SearchConfig.validate)")


def initialize(initial: list[Config], config: SearchConfig, evaluator: Evaluator,
               rng: np.random.Generator) -> SearchState:
    """One starting point is taken as is; several are ranked on ``initial_tokens`` tokens."""
    start = time.perf_counter()
    if len(initial) == 1:
        return SearchState(initial[0], None, 0, rng.bit_generator.state, contenders=[initial[0]])
    s = select(list(initial), None, [(1, config.initial_tokens)], evaluator, rng, config.accept_sigmas)
    log = GenerationLog(0, s.fitness, s.evaluations, s.tokens, time.perf_counter() - start, s.winner)
    return SearchState(s.winner, s.fitness, 0, rng.bit_generator.state, [log], s.tied)


def evolve(problem: Problem, evaluator: Evaluator, initial: list[Config], config: SearchConfig,
           state: SearchState | None = None,
           on_generation: Callable[[SearchState], None] | None = None,
           on_start: Callable[[SearchState], None] | None = None) -> SearchState:
    """Run the search to ``config.generations``; pass a checkpointed ``state`` to resume.

    ``on_start`` sees the state once, initialised or resumed, before anything else is scored: the
    place to fix what depends on the initial population (the per-source reference of the fitness).
    """
    config.validate()
    bad = [c for c in initial if not problem.feasible(c)]
    if bad:
        raise ValueError(f"initial configuration violates the budget: {bad[0]}")
    rng = np.random.default_rng(config.seed)
    fresh = state is None
    if state is None:
        state = initialize(initial, config, evaluator, rng)
    else:
        rng.bit_generator.state = state.rng_state
    if on_start:
        on_start(state)
    if fresh and on_generation:
        on_generation(state)
    while state.generation < config.generations:
        start = time.perf_counter()
        children = offspring(state.parent, problem, rng, config.offspring, config.max_switches)
        s = select(children, state.parent, config.stages, evaluator, rng, config.accept_sigmas)
        state.generation += 1
        state.parent, state.fitness = s.winner, s.fitness
        state.rng_state = rng.bit_generator.state
        state.history.append(GenerationLog(state.generation, s.fitness, s.evaluations, s.tokens,
                                           time.perf_counter() - start, s.winner, len(children),
                                           best_child=s.best_child, noise=s.noise))
        if on_generation:
            on_generation(state)
    return state
