"""Shared fixtures: tiny random Llama-like models built in code, and token pools over them."""

import numpy as np
import pytest
import torch

from evopress.data import TokenPool
from evopress.fitness import Evaluator, FitnessConfig
from evopress.models import Decoder


def tiny_model(arch: str = "llama", layers: int = 6, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=97, max_position_embeddings=128,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
    }[arch]
    extra = {"head_dim": 8} if arch == "gemma" else {}
    model = model_cls(config_cls(**common, **extra, attn_implementation="sdpa"))
    # Random init gives near-uniform predictions; scale weights up so configurations differ clearly.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(8.0)
    return model.eval().requires_grad_(False)


@pytest.fixture
def decoder() -> Decoder:
    return Decoder(tiny_model())


@pytest.fixture
def pool() -> TokenPool:
    g = torch.Generator().manual_seed(1)
    return TokenPool(torch.randint(0, 97, (12, 16), generator=g), "random")


WORDS = ("the of and to in is was for on as with by at from his that an are which it be this had were "
         "not or first also but one their after new has been other its they who two all more into "
         "city world war state river music film team known many most time year between during used").split()


def word_tokenizer(add_bos: bool = False):
    """A word-level tokenizer over ``WORDS``; ``add_bos`` prepends <s> the way Llama-3 and Gemma tokenizers do."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def write_tiny_checkpoint(root, layers: int = 6, model=None, tokenizer=None):
    """A tiny random model (Llama unless given) + tokenizer (word-level unless given) + a text file, as a
    user would pass with --model/--data."""
    fast = tokenizer if tokenizer is not None else word_tokenizer()
    model = model if model is not None else tiny_model(layers=layers)
    model.resize_token_embeddings(len(fast))
    model.save_pretrained(root / "model")
    fast.save_pretrained(root / "model")
    rng = __import__("random").Random(0)
    docs = ["\n".join(" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(3)) for _ in range(120)]
    (root / "text.txt").write_text("\n\n".join(docs))
    return root / "model", root / "text.txt"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def tiny_quant_database(root, layers: int, bits: tuple[int, ...], symmetric: bool = False):
    """A tiny Llama, its dense weights, a random-token pool and a quant database at ``bits`` (group 16,
    3-bit calibration) under ``root``; the model is left dense (the build leaves 3-bit weights in place)."""
    from evopress.spaces.quant.build import build_quant_database

    model = tiny_model(layers=layers)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    pool = TokenPool(torch.randint(0, 97, (12, 16), generator=torch.Generator().manual_seed(1)), "random")
    manifest = build_quant_database(Decoder(model), pool, root, bits, 16, 3, batch_size=4, progress=False,
                                    symmetric=symmetric)
    model.load_state_dict(dense)
    return model, dense, pool, root, manifest


def tiny_sparsity_database(root, model, pool, step: int = 24, center: float = 0.5, levels: int = 4):
    """A SparseGPT database of ``model`` (left dense: the build installs nothing) on ``pool`` under ``root``,
    centred at ``center`` with ``levels`` levels of ``step`` weights each side."""
    from evopress.spaces.sparsity.build import build_sparsity_database

    return build_sparsity_database(Decoder(model), pool, root, center, levels, step, batch_size=4, progress=False)


def logits_under(space, config):
    """Fixed token ids of the tiny models' vocabulary and the logits the model gives with ``config`` applied
    (left applied: export and reload tests compare against it)."""
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    space.apply(config)
    return ids, space.decoder.model(ids).logits


def assert_mutations_stay_in_the_byte_window(space, seed):
    """A random configuration and every child the EA keeps lie in the budget window, with the bytes the
    space reports; raw mutations land there at least sometimes (how often depends on the layers' steps)."""
    from evopress.evolution import mutate, offspring

    p, rng = space.problem, np.random.default_rng(seed)
    parent = space.random_config(rng)
    assert p.budget - p.slack <= p.cost(parent) <= p.budget
    assert any(p.feasible(mutate(parent, p, rng, 3)) for _ in range(40))
    for child in offspring(parent, p, rng, 8, 3):
        assert p.budget - p.slack <= p.cost(child) == space.size_bytes(child) <= p.budget


def assert_random_and_mutants_reuse_exactly(space, pool, randoms, mutants):
    """Prefix reuse is exact on random configurations and on children of the first (which share prefixes)."""
    from evopress.evolution import mutate

    configs = space.random_configs(np.random.default_rng(7), randoms)
    configs += [mutate(configs[0], space.problem, np.random.default_rng(s), 3) for s in range(mutants)]
    assert_prefix_reuse_matches_full_forward(space, pool, configs, 1 << 30)
    space.apply(None)


def assert_prefix_reuse_matches_full_forward(space, pool, configs, cache_bytes, tokens=96, seed=4):
    """The optimised evaluator (prefix reuse, cached teacher) gives the naive evaluator's KL and NLL, bit
    for bit.

    Shared by every space's tests: the evaluator must be exact whatever ``apply`` rewrites. Both run the
    same batches through the same blocks, and a reused boundary holds the very tensors the naive run
    recomputes, so nothing may differ, not even in the last bit: measured identical on every case of
    every space under ATEN_CPU_CAPABILITY=default, avx2 and avx512 with 1 and 2 threads. A tolerance
    would hide a boundary taken from a candidate that differs in a block after it by a small amount.
    """
    configs = list(configs) + [configs[0]]  # a duplicate shares its whole prefix
    sample = pool.sample(tokens, np.random.default_rng(seed))
    naive = Evaluator(space, pool, FitnessConfig(prefix_reuse=False))
    reuse = Evaluator(space, pool, FitnessConfig(cache_bytes=cache_bytes))
    a, b = naive.measure(configs, sample), reuse.measure(configs, sample)
    assert [(m.kl, m.nll, m.dense_nll, m.positions) for m in b] == [(m.kl, m.nll, m.dense_nll, m.positions) for m in a]
    if cache_bytes > 1:
        assert reuse.stats.block_tokens < naive.stats.block_tokens
    assert naive.stats.block_tokens == naive.stats.naive_block_tokens
