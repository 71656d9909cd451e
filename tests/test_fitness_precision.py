"""KL fitness in bf16/fp16 models: head, logsumexp and hidden-space products in float32, so the fitness
itself adds no error beyond a float32 model's; vocabulary chunking changes nothing but memory."""

import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from evopress.data import TokenPool
from evopress.fitness import Evaluator, FitnessConfig, chunk_positions, compare, teacher_targets
from evopress.models import Decoder, head_rows
from evopress.spaces.drop import DropSpace

from .conftest import tiny_model

HALF = [torch.bfloat16, torch.float16]


def low_precision_decoder(dtype: torch.dtype, head: str, monkeypatch) -> Decoder:
    decoder = Decoder(tiny_model().to(dtype))
    if head == "bias":
        g = torch.Generator().manual_seed(0)
        bias = torch.nn.Parameter(torch.randn(decoder.head.weight.shape[0], generator=g).to(dtype))
        monkeypatch.setattr(decoder.head, "bias", bias)
    elif head == "softcap":
        monkeypatch.setattr(decoder, "softcap", 2.0)
    return decoder


def whole_window_sample(pool: TokenPool, windows: int, seed: int):
    """Whole windows only: a truncated window runs at another shape than its teacher did, and a bf16
    forward is not shape-invariant (its own rounding, not the fitness's)."""
    sample = pool.sample(windows * pool.seq_len, np.random.default_rng(seed))
    assert set(sample.lengths) == {pool.seq_len}
    return sample


def float64_kl(decoder: Decoder, space, config, pool, sample) -> float:
    """The definition on the same low-precision hidden states, every head operation in float64."""
    weight = decoder.head.weight.double()
    bias = None if decoder.head.bias is None else decoder.head.bias.double()
    total, n = 0.0, 0
    for i in sample.index:
        log_probs = []
        for c in (None, config):
            space.apply(c)
            *_, h = decoder.run_blocks(pool.windows[i: i + 1])
            z = F.linear(decoder.norm(h)[0, :-1].double(), weight, bias)
            if decoder.softcap:
                z = torch.tanh(z / decoder.softcap) * decoder.softcap
            log_probs.append(F.log_softmax(z, -1))
        p, q = log_probs
        total += (p.exp() * (p - q)).sum().item()
        n += len(p)
    space.apply(None)
    return total / n


@pytest.mark.parametrize("head", ["plain", "bias", "softcap"])
@pytest.mark.parametrize("dtype", HALF)
def test_dense_kl_is_zero_in_low_precision(pool, dtype, head, monkeypatch):
    decoder = low_precision_decoder(dtype, head, monkeypatch)
    space = DropSpace(decoder, 0.34, "sublayer")
    ev = Evaluator(space, pool, FitnessConfig(batch_size=4))  # teacher batches differ from stage batches
    dense = ev.measure([tuple([0] * 12)], whole_window_sample(pool, 7, seed=0))[0]
    assert abs(dense.kl) < 1e-6
    assert dense.nll == pytest.approx(dense.dense_nll, abs=1e-6)


@pytest.mark.parametrize("head", ["plain", "bias", "softcap"])
@pytest.mark.parametrize("dtype", HALF)
def test_low_precision_kl_is_the_float64_kl_of_the_same_hidden_states(pool, dtype, head, monkeypatch):
    """1e-6 absolute: what a float32 model's fitness achieves (float32 logsumexp over ~100 logits of
    size ~10 is good to ~1e-6); half-precision logits were off by ~3e-5."""
    decoder = low_precision_decoder(dtype, head, monkeypatch)
    space = DropSpace(decoder, 0.34, "sublayer")
    ev = Evaluator(space, pool)
    sample = whole_window_sample(pool, 3, seed=1)
    configs = space.initial_configs(np.random.default_rng(2), 3)
    for config, kl in zip(configs, ev.score(configs, sample)):
        assert kl == pytest.approx(float64_kl(decoder, space, config, pool, sample), abs=1e-6)


@pytest.mark.parametrize("dtype, rel", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_low_precision_kl_is_close_to_the_float32_models(pool, dtype, rel):
    """The tolerance is the model's, not the fitness's: bf16 keeps 8 significant bits (fp16 11), so every
    weight and activation is off by up to 2^-9 (2^-12) relative; logits and the KL, a smooth function of
    them, move by a few times that through 6 blocks (measured: 0.3% for bf16, 0.03% for fp16)."""
    sample = whole_window_sample(pool, 6, seed=3)
    scores = []
    for model in (tiny_model(), tiny_model().to(dtype)):
        space = DropSpace(Decoder(model), 0.34, "sublayer")
        scores.append(Evaluator(space, pool).score(space.initial_configs(np.random.default_rng(4), 4), sample))
    fp32, low = scores
    assert low == pytest.approx(fp32, rel=rel)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_vocabulary_chunks_give_the_logits_of_one_chunk(dtype):
    decoder = Decoder(tiny_model().to(dtype))
    h = decoder.norm(torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0)).to(dtype))
    whole = decoder.logits(h)
    chunked = decoder.logits(h, block_bytes=4 * 32 * 10)  # 10 of 97 rows of a half-precision head at once
    assert whole.dtype == chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    exact = F.linear(h.double(), decoder.head.weight.double())
    torch.testing.assert_close(whole.double(), exact, rtol=1e-6, atol=1e-5)  # float32 arithmetic, not bf16


@pytest.mark.parametrize("head", ["plain", "softcap"])
def test_chunking_over_vocabulary_and_positions_gives_the_kl_of_one_chunk(pool, head, monkeypatch):
    decoder = low_precision_decoder(torch.bfloat16, head, monkeypatch)
    space = DropSpace(decoder, 0.34, "sublayer")
    sample = pool.sample(70, np.random.default_rng(5))
    configs = space.initial_configs(np.random.default_rng(6), 3)
    small = 8 * 97 * 5  # a float64 [5, vocab] teacher block; float32 head rows 30 at a time
    assert head_rows(decoder.head.weight, small) == 30 and chunk_positions(1024, small, 97, 4) == 10
    one = Evaluator(space, pool).measure(configs, sample)
    many = Evaluator(space, pool, FitnessConfig(block_bytes=small)).measure(configs, sample)
    for a, b in zip(one, many):
        assert b.kl == pytest.approx(a.kl, rel=1e-6, abs=1e-8)
        assert b.nll == pytest.approx(a.nll, rel=1e-6)
        assert b.dense_nll == pytest.approx(a.dense_nll, rel=1e-6)


def test_no_whole_float32_copy_of_a_half_precision_head(pool, monkeypatch):
    decoder = Decoder(tiny_model().to(torch.bfloat16))
    space = DropSpace(decoder, 0.34, "sublayer")
    ev = Evaluator(space, pool, FitnessConfig(block_bytes=4 * 32 * 16))  # 16 vocabulary rows at a time
    upcast: list[int] = []
    to_float = torch.Tensor.float

    def recording(self, *args, **kwargs):
        if self.dtype == torch.bfloat16 and self.shape[-1:] == (32,) and self.shape[0] > 16:
            upcast.append(self.shape[0])
        return to_float(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "float", recording)
    ev.score(space.initial_configs(np.random.default_rng(7), 2), pool.sample(32, np.random.default_rng(8)))
    assert 97 not in upcast  # hidden states [positions, 32] are upcast whole; the head [97, 32] never


def test_chunk_bounds_for_a_large_vocabulary():
    """The numbers docs/scaling.md quotes: 128,256 tokens, hidden 8,192, 256 MiB blocks."""
    weight = torch.empty(128256, 8192, dtype=torch.bfloat16, device="meta")
    assert head_rows(weight, 256 << 20) == 8192
    assert head_rows(weight.float(), 256 << 20) == 128256  # float32 needs no copy
    assert chunk_positions(1024, 256 << 20, 128256, 4) == 523
    assert chunk_positions(1024, 256 << 20, 128256, 16) == 130  # teacher: two float64 blocks


class VocabularyBlocks(TorchDispatchMode):
    """The most bytes of [..., vocab] tensors made inside that were alive at once (a storage counts once,
    however many views of it there are)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.views, self.size, self.live, self.peak = vocab, {}, {}, 0, 0

    def _release(self, key: int) -> None:
        self.views[key] -= 1
        if not self.views[key]:
            del self.views[key]
            self.live -= self.size.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab:
                key = t.untyped_storage().data_ptr()
                if key not in self.views:
                    self.views[key], self.size[key] = 0, t.untyped_storage().nbytes()
                    self.live += self.size[key]
                    self.peak = max(self.peak, self.live)
                self.views[key] += 1
                weakref.finalize(t, self._release, key)
        return out


@torch.inference_mode()
def test_lm_head_temporaries_stay_within_one_block():
    """``block_bytes`` bounds what the LM head's temporaries take at once, teacher and candidate: on a CPU
    they are host RAM next to the model and the caches (the teacher's float64 softmax once held three
    blocks: log p, p and their product)."""
    decoder = Decoder(tiny_model())
    vocab, g = decoder.head.weight.shape[0], torch.Generator().manual_seed(0)
    student = decoder.norm(torch.randn(2, 101, 32, generator=g))
    labels = torch.randint(0, vocab, (200,), generator=g)
    block = 8 * vocab * 20  # 20 positions of float64 logits
    with VocabularyBlocks(vocab) as teacher:
        targets = teacher_targets(decoder, student[:, :-1].reshape(-1, 32), labels, 1024, block)
    with VocabularyBlocks(vocab) as candidate:
        compare(decoder, student, {**targets, "labels": labels}, 1024, block)
    assert 0 < teacher.peak <= block and 0 < candidate.peak <= block
