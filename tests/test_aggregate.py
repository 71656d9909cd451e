"""Per-source fitness, the aggregates over sources, and the noise of a paired difference."""

import numpy as np
import pytest
import torch

from evopress.data import TokenPool
from evopress.fitness import Aggregate, Evaluator, FitnessConfig
from evopress.models import Decoder
from evopress.spaces.drop import DropSpace

from .conftest import tiny_model

SOURCES = np.array([0, 0, 1, 1])
POSITIONS = np.full(4, 10.0)


def score(kind: str, per_window_mean: list[float], reference=None):
    agg = Aggregate(kind, ("news", "code"), None if reference is None else np.array(reference))
    return agg, agg.score(np.array(per_window_mean) * POSITIONS, POSITIONS, SOURCES)


def test_per_source_means_and_a_source_the_windows_miss():
    agg = Aggregate("sources", ("news", "code", "chat"))
    got = agg.per_source(np.array([1.0, 3.0, 10.0]), np.array([1.0, 1.0, 5.0]), np.array([0, 0, 1]))
    assert got[:2] == pytest.approx([2.0, 2.0]) and np.isnan(got[2])
    assert agg.value(np.array([1.0, 3.0, 10.0]), np.array([1.0, 1.0, 5.0]), np.array([0, 0, 1])) == 2.0


def test_the_aggregates_rank_a_domain_trade_as_each_says():
    """Reference: news 1.0, code 0.2 (code is easy). A is 10% better on news and 40% worse on code; B is even.

    The token mean sees only A's absolute gain on news (0.1 > 0.08) and prefers A; per source, A's 40%
    loss on code outweighs its 10% gain; and A's worst source is worse than B's.
    """
    ref = [1.0, 0.2]
    a = [0.9, 0.9, 0.28, 0.28]
    b = [1.0, 1.0, 0.2, 0.2]
    for kind, a_wins in (("tokens", True), ("sources", False), ("worst", False)):
        agg, sa = score(kind, a, ref)
        _, sb = score(kind, b, ref)
        assert (sa < sb) == a_wins, kind
    assert score("tokens", a, ref)[1] == pytest.approx((0.9 + 0.28) / 2)
    assert score("sources", a, ref)[1] == pytest.approx((0.9 + 1.4) / 2)
    assert score("worst", a, ref)[1] == pytest.approx(1.4)
    assert score("sources", b, ref)[1] == pytest.approx(1.0) == score("worst", b, ref)[1]


def test_one_source_ranks_alike_under_every_aggregate():
    rng = np.random.default_rng(0)
    sums = [rng.random(6) * 16 for _ in range(5)]
    positions, sources = np.full(6, 16.0), np.zeros(6, dtype=int)
    orders = {kind: np.argsort([Aggregate(kind, ("x",), np.array([0.7])).value(s, positions, sources) for s in sums])
              for kind in ("tokens", "sources", "worst")}
    assert (orders["tokens"] == orders["sources"]).all() and (orders["tokens"] == orders["worst"]).all()


def test_noise_is_the_standard_error_of_the_paired_difference():
    """For the token mean over equal windows the jackknife is the textbook standard error of the mean
    difference; a constant shift on every window is no noise at all; one window gives none to measure."""
    rng = np.random.default_rng(1)
    n = 8
    positions, sources = np.full(n, 32.0), np.zeros(n, dtype=int)
    agg = Aggregate("tokens", ("x",))
    a = agg.score(rng.random(n) * 32, positions, sources)
    b = agg.score(rng.random(n) * 32, positions, sources)
    d = (a.sums - b.sums) / 32
    assert agg.noise(a, b) == pytest.approx(d.std(ddof=1) / np.sqrt(n))
    shifted = agg.score(a.sums + 3.2, positions, sources)
    assert agg.noise(shifted, a) == pytest.approx(0, abs=1e-12)
    one = agg.score(a.sums[:1], positions[:1], sources[:1])
    assert agg.noise(one, one) == 0.0
    worst = Aggregate("worst", ("x", "y"), np.array([1.0, 1.0]))
    two = np.array([0, 1] * 4)
    assert worst.noise(worst.score(a.sums, positions, two), worst.score(b.sums, positions, two)) > 0


def test_the_evaluator_keeps_per_window_sums_and_per_source_kls():
    """Window sums add up to the sample's means, each window's source is the pool's label, and a mixed
    pool's samples hold every source in equal shares."""
    torch.manual_seed(0)
    windows = torch.randint(0, 97, (12, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2] * 4)
    pool = TokenPool(windows, "news+code+chat", labels=labels)
    assert pool.names == ("news", "code", "chat")
    rng = np.random.default_rng(0)
    for _ in range(5):
        sample = pool.sample(6 * 16, rng)
        assert sorted(np.bincount(labels[sample.index].numpy(), minlength=3)) == [2, 2, 2]
    sample = pool.sample(5 * 16 + 3, rng)  # truncated last window: shares equal up to one window
    assert max(np.bincount(labels[sample.index].numpy(), minlength=3)) == 2
    space = DropSpace(Decoder(tiny_model()), 0.34, "sublayer")
    ev = Evaluator(space, pool, FitnessConfig(batch_size=4, aggregate="sources"))
    config = space.random_config(np.random.default_rng(0))
    m = ev.measure([config], sample)[0]
    assert m.windows.shape == (len(sample.index), 3)
    assert m.sources.tolist() == [int(labels[w]) for _, ws in pool.batches(sample, 4) for w in ws]
    assert m.windows[:, 0].sum() / m.window_positions.sum() == pytest.approx(m.kl, rel=1e-12)
    assert m.window_positions.sum() == m.positions == 5 * 15 + 2
    per_source = ev.per_source(m)
    assert set(per_source) == {"news", "code", "chat"} and all(v > 0 for v in per_source.values())
    weights = [m.window_positions[m.sources == s].sum() for s in range(3)]
    assert np.average(list(per_source.values()), weights=weights) == pytest.approx(m.kl, rel=1e-9)
    # the reference makes the initial parent score 1 on every source
    ev.set_reference(config, sample)
    assert float(ev.score([config], sample)[0]) == pytest.approx(1.0, rel=1e-9)
