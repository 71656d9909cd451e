"""KL fitness: zero for the dense model, cache and prefix reuse change nothing but speed."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evopress.fitness import Evaluator, FitnessConfig
from evopress.spaces.drop import DropSpace

from .conftest import assert_prefix_reuse_matches_full_forward


def test_kl_is_zero_for_dense_and_positive_otherwise(decoder, pool):
    space = DropSpace(decoder, 0.34, "sublayer")
    ev = Evaluator(space, pool)
    sample = pool.sample(100, np.random.default_rng(0))
    configs = [tuple([0] * 12)] + space.initial_configs(np.random.default_rng(1), 4)
    scores = ev.score(configs, sample)
    assert scores[0] == pytest.approx(0.0, abs=1e-6)
    assert all(s > 1e-3 for s in scores[1:])


def reference_kl(model, space, config, pool, sample):
    """Full-logit KL straight from the HF forward, no caches: the definition."""
    total, n = 0.0, 0
    for i, length in zip(sample.index, sample.lengths):
        ids = pool.windows[i: i + 1, :length]
        space.apply(None)
        with torch.no_grad():
            p = F.log_softmax(model(input_ids=ids).logits.float()[0, :-1], -1)
            space.apply(config)
            q = F.log_softmax(model(input_ids=ids).logits.float()[0, :-1], -1)
        total += (p.exp() * (p - q)).sum().item()
        n += length - 1
    return total / n


def test_teacher_cache_matches_uncached_full_logit_kl(decoder, pool):
    space = DropSpace(decoder, 0.34, "sublayer")
    ev = Evaluator(space, pool, FitnessConfig(chunk_tokens=7))  # many chunks, odd boundaries
    sample = pool.sample(70, np.random.default_rng(2))  # 4 full windows + one truncated to 6 tokens
    assert sorted(set(sample.lengths)) == [6, 16]
    configs = space.initial_configs(np.random.default_rng(3), 3)
    for config, kl in zip(configs, ev.score(configs, sample)):
        assert kl == pytest.approx(reference_kl(decoder.model, space, config, pool, sample), rel=1e-4)


@pytest.mark.parametrize("granularity", ["sublayer", "block"])
@pytest.mark.parametrize("cache_bytes", [1 << 30, 16 * 32 * 4 * 24, 1])  # ample, evicting, none
def test_prefix_reuse_equals_full_forward(decoder, pool, granularity, cache_bytes):
    space = DropSpace(decoder, 0.34, granularity)
    assert_prefix_reuse_matches_full_forward(space, pool, space.initial_configs(np.random.default_rng(4), 10),
                                             cache_bytes)


def test_ppl_fitness_is_the_candidate_nll(decoder, pool):
    space = DropSpace(decoder, 0.34, "sublayer")
    sample = pool.sample(48, np.random.default_rng(5))
    config = space.random_config(np.random.default_rng(6))
    kl_ev = Evaluator(space, pool)
    ppl_ev = Evaluator(space, pool, FitnessConfig(metric="ppl"))
    m = kl_ev.measure([config], sample)[0]
    assert ppl_ev.score([config], sample)[0] == pytest.approx(m.nll)
    assert m.nll > m.dense_nll - 1e-6 or m.kl > 0
