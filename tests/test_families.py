"""Family smoke tests: what real checkpoints of current families carry, through every space's CLI.

Each family is a tiny random checkpoint with the features its real checkpoints have (Gemma-3's
interleaved sliding/global attention, q/k norms, scaled embeddings and pre/post norms, also inside the
vision-language wrapper that Gemma-3 4B and up ship as; Qwen2's q/k/v bias, untied head and BPE
tokenizer; Llama-3 rope scaling; Mistral's sliding window; tokenizers that add BOS). Depth, sparsity
and quant each run build-db / search / export, and the exported checkpoint, reloaded as a user would,
must compute the searched configuration's logits. Windows (32 tokens) are longer than the sliding
windows (8), so a wrong mask per layer type would change the numbers.
"""

import random

import pytest
import torch

import evopress
from evopress.cli import main
from evopress.data import load_pool
from evopress.pipeline import load_result
from evopress.spaces.drop import DropSpace
from evopress.spaces.drop.export import export as export_depth
from evopress.spaces.drop.space import DroppedAttention, DroppedMLP

from .conftest import WORDS, word_tokenizer, write_tiny_checkpoint

SEQ_LEN, WINDOW = 32, 8
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128)
GEMMA3 = dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=WINDOW,
              layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
              rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
# family -> (transformers config class, its text-model extras, tokenizer: "words", "words+bos" or "bpe")
FAMILIES = {
    "gemma3": ("Gemma3TextConfig", GEMMA3, "words+bos"),
    "gemma3-vlm": ("Gemma3Config", GEMMA3, "words+bos"),  # Gemma-3 4B+: the same text model inside a VLM
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False), "bpe"),
    "llama3": ("LlamaConfig", dict(rope_parameters=LLAMA3_ROPE), "words+bos"),
    "mistral": ("MistralConfig", dict(sliding_window=WINDOW), "words+bos"),
}
TINY_SIGLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                   patch_size=14)
SPACES = ("drop", "sparsity", "quant")


def byte_bpe_tokenizer():
    """A byte-level BPE trained on ``WORDS``, as Qwen2 ships: transformers 5 loads any checkpoint of
    model_type qwen2 with ``Qwen2Tokenizer``, which rebuilds a BPE from tokenizer.json's vocab and merges
    (a word-level tokenizer.json would tokenize every word to nothing)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(50)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def family_tokenizer(family: str):
    kind = FAMILIES[family][2]
    return byte_bpe_tokenizer() if kind == "bpe" else word_tokenizer(add_bos=kind == "words+bos")


def family_model(family: str):
    """A tiny random model of ``family`` whose biases and norm weights are non-trivial, so they matter."""
    import transformers

    config_cls, extra, _ = FAMILIES[family]
    text = dict(TEXT, vocab_size=len(family_tokenizer(family)), **extra)
    config_cls = getattr(transformers, config_cls)
    config = config_cls(text_config=text, vision_config=TINY_SIGLIP, mm_tokens_per_image=4) \
        if "vision_config" in config_cls.sub_configs else config_cls(**text)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0) if p.ndim == 2 else p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """family -> (model dir, text file), each written once per module."""
    made: dict[str, tuple] = {}

    def get(family: str):
        if family not in made:
            made[family] = write_tiny_checkpoint(tmp_path_factory.mktemp(family), model=family_model(family),
                                                 tokenizer=family_tokenizer(family))
        return made[family]

    return get


def _run_space(space: str, model, text, tmp_path) -> None:
    """build-db (where the space has one), search and export through the CLI."""
    common = ["--model", str(model), "--data", str(text), "--seq-len", str(SEQ_LEN), "--calib-tokens", "256",
              "--quiet"]
    search = ["search", "--space", space, "--generations", "2", "--offspring", "3", "--stages", "1:64",
              "--initial-candidates", "2", "--initial-tokens", "32", "--final-tokens", "64", "--init-from", "none",
              "--out", str(tmp_path / "evo"), *common]
    db = ["--db", str(tmp_path / "db")]
    if space == "drop":
        search += ["--target", "0.5", "--granularity", "block"]  # whole blocks go: layer_types must follow
    elif space == "sparsity":
        assert main(["build-db", "--space", space, "--target", "0.5", "--levels", "2", "--out", str(tmp_path / "db"),
                     *common]) == 0
        search += ["--target", "0.5", *db]
    else:
        assert main(["build-db", "--space", space, "--bits", "2,3,4", "--out", str(tmp_path / "db"), *common]) == 0
        search += ["--target", "3", *db]
    assert main(search) == 0
    assert main(["export", str(tmp_path / "evo"), "--out", str(tmp_path / "export"), "--quiet"]) == 0
    if space == "drop":  # a format of another space: one line, exit 2
        assert main(["export", str(tmp_path / "evo"), "--out", str(tmp_path / "x"), "--format", "sparse-bitmask",
                     "--quiet"]) == 2


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("family", FAMILIES)
def test_build_search_export_reload(family, space, checkpoint, tmp_path):
    model_dir, text = checkpoint(family)
    _run_space(space, model_dir, text, tmp_path)
    _, loaded, searched, config = load_result(tmp_path / "evo")
    ids = load_pool(loaded.tokenizer, str(text), "calibration", SEQ_LEN, 2 * SEQ_LEN).windows
    searched.apply(config)
    with torch.no_grad():
        expected = loaded.model(input_ids=ids).logits.float()
    # what the fitness sees (the block stack with captured per-layer masks and RoPE) is the model itself
    decoder = loaded.decoder
    *_, h = decoder.run_blocks(ids)
    torch.testing.assert_close(decoder.logits(decoder.norm(h)), expected, rtol=1e-5, atol=1e-5)
    reloaded = evopress.load_compressed(tmp_path / "export")  # every space's export, one loader
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits.float(), expected, rtol=1e-5, atol=1e-5)
    _assert_features_kept(loaded.model.config.get_text_config(), reloaded.config.get_text_config(), space,
                          searched, config)


def _assert_features_kept(dense, exported, space, searched, config) -> None:
    """The exported config still carries the family's features, and removed blocks took their layer type."""
    if space == "drop":
        kept = [b for b, (a, m) in enumerate(searched.masks(config)) if not (a and m)]
        assert exported.num_hidden_layers == len(kept) < dense.num_hidden_layers
        if getattr(dense, "layer_types", None):
            assert exported.layer_types == [dense.layer_types[b] for b in kept]
    for key in ("sliding_window", "rope_parameters", "tie_word_embeddings", "query_pre_attn_scalar"):
        assert getattr(exported, key, None) == getattr(dense, key, None), key


@pytest.mark.parametrize("family", FAMILIES)
def test_sublayer_depth_export_reloads_with_identical_logits(family, tmp_path):
    """Lone dropped sub-blocks (zeroed output projections) next to removed blocks, in every family."""
    from transformers import AutoModelForCausalLM

    from evopress.models import Decoder

    model = family_model(family)
    space = DropSpace(Decoder(model), 0.5, "sublayer")
    config = space.config_from_masks([(False, False), (True, True), (True, False),
                                      (False, False), (True, True), (False, True)])
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (2, SEQ_LEN),
                        generator=torch.Generator().manual_seed(0))
    space.apply(config)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    export_depth(space, config, tmp_path, family_tokenizer(family))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    fast = evopress.load_compressed(tmp_path)  # the two lone dropped sub-blocks compute nothing
    layers = Decoder(fast).layers
    assert isinstance(getattr(layers[1], space.decoder.attn_attr), DroppedAttention)  # block 2 of the original
    assert isinstance(getattr(layers[3], space.decoder.mlp_attr), DroppedMLP)  # block 5
    assert sum(isinstance(m, (DroppedAttention, DroppedMLP)) for m in fast.modules()) == 2
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_a_tokenizer_that_adds_bos_gets_it_at_the_start_of_every_window(checkpoint):
    """--bos auto does what the tokenizer does: BOS first, then SEQ_LEN - 1 tokens of text, no other BOS."""
    from transformers import AutoTokenizer

    from evopress.data import bos_token

    model_dir, text = checkpoint("llama3")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    bos = tokenizer.bos_token_id
    assert tokenizer("the city")["input_ids"][0] == bos
    pool = load_pool(tokenizer, str(text), "calibration", SEQ_LEN, 256, bos_token(tokenizer, "auto"))
    assert (pool.windows[:, 0] == bos).all() and not (pool.windows[:, 1:] == bos).any()
    plain = load_pool(tokenizer, str(text), "calibration", SEQ_LEN, 256, bos_token(tokenizer, "never"))
    assert not (plain.windows == bos).any()


def test_depth_export_refuses_a_config_that_does_not_count_the_blocks(tmp_path):
    """Removing blocks is written as num_hidden_layers; a config counting something else must not reload
    freshly initialised blocks in their place."""
    from evopress.errors import UserError
    from evopress.models import Decoder

    model = family_model("llama3")
    model.config.num_hidden_layers = 7
    space = DropSpace(Decoder(model), 0.5, "block")
    with pytest.raises(UserError, match="num_hidden_layers"):
        export_depth(space, (1, 1, 1, 0, 0, 0), tmp_path, family_tokenizer("llama3"))
    assert len(space.decoder.layers) == 6 and not any(tmp_path.iterdir())
