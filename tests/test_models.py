"""The structural decoder view and the depth space on tiny models of several architectures."""

import pytest
import torch
from torch import nn

from evopress.errors import UserError
from evopress.models import Decoder
from evopress.spaces.drop import DropSpace
from evopress.spaces.drop.export import export

from .conftest import tiny_model

ARCHS = ["llama", "mistral", "qwen2", "phi3", "gemma"]


@pytest.mark.parametrize("arch", ARCHS)
def test_block_stack_reproduces_the_model_forward(arch):
    model = tiny_model(arch)
    dec = Decoder(model)
    ids = torch.randint(0, 97, (2, 11))
    *_, h = dec.run_blocks(ids)
    with torch.no_grad():
        expected = model(input_ids=ids).logits.float()
    torch.testing.assert_close(dec.logits(dec.norm(h)), expected, rtol=1e-4, atol=1e-4)
    assert dec.num_blocks == 6
    assert len(dec.linear_layers()) == 6 * len([m for m in dec.layers[0].modules() if isinstance(m, nn.Linear)])


@pytest.mark.parametrize("arch", ARCHS)
def test_dropped_sub_blocks_are_exact_identities_on_the_residual_stream(arch):
    dec = Decoder(tiny_model(arch))
    space = DropSpace(dec, 0.5, "sublayer")
    ids = torch.randint(0, 97, (2, 9))
    inputs = dec.enter(ids)
    h = torch.randn_like(inputs.hidden)
    L = dec.num_blocks
    with torch.inference_mode():
        space.apply(tuple([1] * L + [1] * L))  # everything dropped (budget ignored on purpose)
        assert torch.equal(dec.run_block(2, h, inputs), h)
        # attention dropped only: the block is exactly h + MLP(post-attention-norm(h))
        space.apply(tuple([1] * L + [0] * L))
        layer = dec.layers[2]
        norm = getattr(layer, "post_attention_layernorm")
        torch.testing.assert_close(dec.run_block(2, h, inputs), h + dec.mlp(2)(norm(h)), rtol=0, atol=1e-6)


def test_apply_restores_the_dense_model():
    model = tiny_model()
    dec = Decoder(model)
    originals = [(dec.attn(b), dec.mlp(b)) for b in range(dec.num_blocks)]
    space = DropSpace(dec, 0.5, "block")
    space.apply(space.random_config(__import__("numpy").random.default_rng(0)))
    assert any(dec.attn(b) is not originals[b][0] for b in range(dec.num_blocks))
    space.apply(None)
    assert all(dec.attn(b) is a and dec.mlp(b) is m for b, (a, m) in enumerate(originals))


def test_drop_budget_and_rounding():
    dec = Decoder(tiny_model(layers=6))
    space = DropSpace(dec, 0.4, "sublayer")  # floor(0.4 * 6) = 2 of each kind
    assert space.k == 2 and space.problem.budget == 4
    config = space.random_config(__import__("numpy").random.default_rng(1))
    assert sum(config[:6]) == 2 and sum(config[6:]) == 2
    report = space.budget_report(config)
    assert report["dropped_attention"] == report["dropped_mlp"] == 2
    for bad in (0.0, 1.0, -0.1, 0.1):  # 0.1 * 6 rounds down to 0 blocks
        with pytest.raises(UserError):
            DropSpace(dec, bad, "sublayer")
    with pytest.raises(UserError, match="granularity"):
        DropSpace(dec, 0.5, "heads")


def test_unknown_architecture_is_a_clear_error():
    class NotALanguageModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])

    with pytest.raises(UserError, match="could not find"):
        Decoder(NotALanguageModel())


@pytest.mark.parametrize("arch", ARCHS)
def test_depth_export_loads_in_transformers_with_identical_logits(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(arch)
    dec = Decoder(model)
    space = DropSpace(dec, 0.5, "sublayer")  # 3 attention + 3 MLP of 6 blocks
    # blocks 1 and 4 dropped whole, attention of 2 and MLP of 5 alone
    config = space.config_from_masks([(False, False), (True, True), (True, False),
                                      (False, False), (True, True), (False, True)])
    ids = torch.randint(0, 97, (2, 10))
    params_before = sum(p.numel() for p in model.parameters())
    block_params = sum(p.numel() for p in dec.layers[1].parameters())
    space.apply(config)
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    class Tok:  # export only needs save_pretrained from the tokenizer
        def save_pretrained(self, out):
            (out / "tokenizer_marker").write_text("x")

    summary = export(space, config, tmp_path, Tok())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 4 == summary["num_hidden_layers"]
    assert sum(p.numel() for p in reloaded.parameters()) == params_before - 2 * block_params
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
