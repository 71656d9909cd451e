"""KL fitness: zero for the dense model, cache and prefix reuse change nothing but speed."""

import collections
import itertools
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evopress.evolution import mutate
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


def test_prefix_cache_keeps_only_boundaries_a_later_candidate_reads(decoder, pool, monkeypatch):
    """A candidate keeps only the boundaries later candidates start from. Why: every boundary of a
    1,024-token stage is 70 MiB of host RAM on the 135M default model, and a stage of one candidate (the
    final score, the held-aside track) kept all of them for nothing."""
    space, run, live = DropSpace(decoder, 0.34, "sublayer"), decoder.run_block, {"now": set(), "peak": 0}

    def counted(b, hidden, inputs):
        out = run(b, hidden, inputs)
        if id(out) not in live["now"]:  # a block may hand back its input
            live["now"].add(id(out))
            live["peak"] = max(live["peak"], len(live["now"]))
            weakref.finalize(out, live["now"].discard, id(out))
        return out

    monkeypatch.setattr(decoder, "run_block", counted)
    ev = Evaluator(space, pool, FitnessConfig(cache_bytes=1 << 30))
    sample = pool.sample(48, np.random.default_rng(0))
    assert len(pool.batches(sample, ev.batch_size)) == 1  # so that each count is one batch's states
    assert decoder.num_blocks == 6

    def dropping(block: int) -> tuple:  # drops one unit of ``block``
        return tuple(int(u == space.unit_block.index(block)) for u in range(len(space.unit_block)))

    dense = tuple([0] * len(space.unit_block))
    # in order dense, dropping(4), dropping(1): dense keeps boundaries 4 and 1, not 1 to 4
    for configs, kept in ([dense], 0), ([dense, dropping(1)], 1), ([dropping(1), dense, dropping(4)], 2):
        live["peak"] = 0
        ev.measure(configs, sample)
        assert live["peak"] <= kept + 2, configs  # the kept ones, the block's input and its output
        assert not live["now"]


@pytest.mark.parametrize("cache_bytes", [1 << 30, 48 * 32 * 4 * 2])  # every boundary, or every 3rd one
def test_each_candidate_starts_where_it_first_differs_from_the_one_before(decoder, pool, cache_bytes):
    """Keeping fewer boundaries costs no blocks: each candidate starts at the last kept boundary within
    the blocks it shares with the candidate before it, as when every boundary was kept."""
    space = DropSpace(decoder, 0.34, "block")
    parent = space.random_config(np.random.default_rng(1))
    configs = [parent] + [mutate(parent, space.problem, np.random.default_rng(s), 3) for s in range(8)]
    sample = pool.sample(48, np.random.default_rng(0))
    ev = Evaluator(space, pool, FitnessConfig(cache_bytes=cache_bytes))
    ev.measure(configs, sample)
    stride = 1 if cache_bytes > 1 << 20 else 3
    keys = sorted(space.block_keys(c) for c in configs)
    starts = [0] + [sum(1 for _ in itertools.takewhile(lambda p: p[0] == p[1], zip(a, b))) // stride * stride
                    for a, b in zip(keys, keys[1:])]
    assert ev.stats.block_tokens == sum(decoder.num_blocks - s for s in starts) * sample.tokens


def test_ppl_fitness_is_the_candidate_nll(decoder, pool):
    space = DropSpace(decoder, 0.34, "sublayer")
    sample = pool.sample(48, np.random.default_rng(5))
    config = space.random_config(np.random.default_rng(6))
    kl_ev = Evaluator(space, pool)
    ppl_ev = Evaluator(space, pool, FitnessConfig(metric="ppl"))
    m = kl_ev.measure([config], sample)[0]
    assert ppl_ev.score([config], sample)[0] == pytest.approx(m.nll)
    assert m.kl > 1e-4 and m.nll != pytest.approx(m.dense_nll)  # dropping sub-blocks changes the model


def decoder_kl(decoder, space, config, pool, sample):
    """Full-logit KL from the decoder's own logits (bias and soft-capping included), no caches."""
    total, n = 0.0, 0
    for i, length in zip(sample.index, sample.lengths):
        ids = pool.windows[i: i + 1, :length]
        log_probs = []
        for c in (None, config):
            space.apply(c)
            *_, h = decoder.run_blocks(ids)
            log_probs.append(F.log_softmax(decoder.logits(decoder.norm(h))[0, :-1], -1))
        p, q = log_probs
        total += (p.exp() * (p - q)).sum().item()
        n += length - 1
    return total / n


@pytest.mark.parametrize("head", ["bias", "softcap"])
def test_kl_for_biased_and_soft_capped_heads(decoder, pool, head, monkeypatch):
    """A biased head takes the hidden-space shortcut; a soft-capped one the full-logit path."""
    if head == "bias":
        bias = torch.nn.Parameter(torch.randn(decoder.head.weight.shape[0], generator=torch.Generator().manual_seed(0)))
        monkeypatch.setattr(decoder.head, "bias", bias)
    else:
        monkeypatch.setattr(decoder, "softcap", 2.0)
    space = DropSpace(decoder, 0.34, "sublayer")
    ev = Evaluator(space, pool, FitnessConfig(chunk_tokens=9))
    sample = pool.sample(50, np.random.default_rng(7))
    configs = space.initial_configs(np.random.default_rng(8), 3)
    for config, m in zip(configs, ev.measure(configs, sample)):
        assert m.kl == pytest.approx(decoder_kl(decoder, space, config, pool, sample), rel=1e-4)
    entry = next(iter(ev.teacher.store.values()))
    assert set(entry) == ({"u", "a", "nll"} if head == "bias" else {"hidden"})


def test_warm_computes_every_window_once(decoder, pool):
    space = DropSpace(decoder, 0.34, "sublayer")
    ev = Evaluator(space, pool)
    ev.warm()
    assert set(ev.teacher.store) == set(range(len(pool.windows)))
    assert ev.stats.teacher_head_tokens == len(pool.windows) * (pool.seq_len - 1)
    ev.score(space.initial_configs(np.random.default_rng(9), 2), pool.sample(64, np.random.default_rng(10)))
    assert ev.stats.teacher_head_tokens == len(pool.windows) * (pool.seq_len - 1)  # nothing left to compute


def test_fp32_product_of_a_half_precision_head_in_row_blocks():
    from evopress.fitness import fp32_product

    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(5, 10, generator=g), -1)
    weight = torch.randn(10, 4, generator=g).to(torch.bfloat16)
    out = fp32_product(p, weight, rows=3)  # 4 blocks, the last one short
    assert out.dtype == torch.float32
    assert torch.allclose(out, p @ weight.float(), atol=1e-6)


HOST_READS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__")


def count_host_syncs(monkeypatch) -> collections.Counter:
    """Counts the calls that make a GPU's host wait: reading tensor values on the host, transfers that
    name a device, device synchronizes. On a CPU they are cheap, but they are counted all the same."""
    counts: collections.Counter = collections.Counter()

    def counting(name, original):
        def wrapper(self, *args, **kwargs):
            counts[name] += 1
            return original(self, *args, **kwargs)
        return wrapper

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    to = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        if "device" in kwargs or any(isinstance(a, (str, torch.device, torch.Tensor)) for a in args):
            counts["to(device)"] += 1
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: counts.update(["synchronize"]))
    return counts


def test_host_syncs_per_stage_do_not_grow_with_the_candidates(decoder, pool, monkeypatch):
    space = DropSpace(decoder, 0.34, "sublayer")
    ev = Evaluator(space, pool, FitnessConfig(batch_size=4))
    ev.warm()
    sample = pool.sample(100, np.random.default_rng(11))  # 7 windows, one truncated: 3 batches
    configs = space.initial_configs(np.random.default_rng(12), 8)
    counts = count_host_syncs(monkeypatch)
    per_stage = []
    for n in (1, 8):
        counts.clear()
        ev.score(configs[:n], sample)
        per_stage.append(dict(counts))
    one, eight = per_stage
    assert eight == one
    assert one["tolist"] == 1  # all candidates' sums read at once


def test_timings_sync_the_device_only_when_profiling(decoder, pool, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    monkeypatch.setattr(type(decoder), "device", property(lambda self: torch.device("cuda", 0)))
    space = DropSpace(decoder, 0.34, "sublayer")
    Evaluator(space, pool)._clock()
    assert calls == []
    Evaluator(space, pool, FitnessConfig(profile=True))._clock()
    assert calls == [torch.device("cuda", 0)]


def values(measurements):
    """Measurements as plain values, per-window sums included, for exact comparison."""
    return [(m.kl, m.nll, m.dense_nll, m.positions, m.windows.tolist(), m.sources.tolist()) for m in measurements]


def test_a_stage_too_big_for_the_device_streams_per_batch_with_the_same_scores(decoder, pool, monkeypatch):
    """Over ``teacher_device_bytes`` a stage's teacher entries stay in host memory and each candidate copies
    them batch by batch; under it they are copied once per batch for the whole stage. Counting the copies
    tells the two paths apart on a CPU, where both copies are no-ops; equal scores show the streamed
    batches are the right ones."""
    from evopress.fitness import evaluator as module

    copies: list[int] = []
    monkeypatch.setattr(module, "to_device", lambda t, device: copies.append(len(t["labels"])) or dict(t))
    space = DropSpace(decoder, 0.34, "sublayer")
    sample = pool.sample(70, np.random.default_rng(13))
    configs = space.initial_configs(np.random.default_rng(14), 3)
    batches = len(pool.batches(sample, FitnessConfig().batch_size))
    resident = Evaluator(space, pool).measure(configs, sample)
    assert len(copies) == batches
    copies.clear()
    assert values(Evaluator(space, pool, FitnessConfig(teacher_device_bytes=0)).measure(configs, sample)) == \
        values(resident)
    assert len(copies) == batches * len(configs) and sum(copies) == len(configs) * sum(
        ids.shape[0] * (ids.shape[1] - 1) for ids, _ in pool.batches(sample, FitnessConfig().batch_size))


def test_batches_by_tokens(decoder, pool):
    """``batch_tokens`` is whole windows per batch: 3 windows of 16 tokens, the same scores as ``batch_size=3``."""
    assert FitnessConfig(batch_tokens=50).windows_per_batch(16) == 3
    assert FitnessConfig(batch_tokens=10).windows_per_batch(16) == 1  # never less than one window
    assert FitnessConfig(batch_size=5).windows_per_batch(16) == 5
    space = DropSpace(decoder, 0.34, "sublayer")
    sample = pool.sample(100, np.random.default_rng(15))
    configs = space.initial_configs(np.random.default_rng(16), 3)
    by_tokens = Evaluator(space, pool, FitnessConfig(batch_size=8, batch_tokens=50))
    assert by_tokens.teacher.batch_size == 3
    assert values(by_tokens.measure(configs, sample)) == values(
        Evaluator(space, pool, FitnessConfig(batch_size=3)).measure(configs, sample))
