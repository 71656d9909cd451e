"""Gguf space on a tiny random Llama whose rows (256, 512) admit the K types: database, levels, fitness, baselines."""

import numpy as np
import pytest
import torch

pytest.importorskip("libgguf", reason="the gguf extra (libgguf) is not installed; make test installs it")

from evopress.data import Sample, TokenPool
from evopress.errors import UserError
from evopress.fitness import Evaluator, FitnessConfig
from evopress.models import Decoder
from evopress.spaces import make_space
from evopress.spaces.gguf import baselines
from evopress.spaces.gguf.build import IMATRIX, build_gguf_database, tensor_levels
from evopress.spaces.gguf.ggufio import read_imatrix
from evopress.spaces.gguf.types import dequantize, fallback, parse_types, quantize, tensor_bytes
from evopress.spaces.plugin import BaselineInputs

from .conftest import assert_mutations_stay_in_the_byte_window

TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q6_K", "Q8_0")
TOL = 0.02  # a 2-block model's tensor steps are ~2% of its bytes; real models use the 0.1% default


def wide_model(layers: int = 2):
    """A Llama whose hidden size (256) and MLP width (512) are multiples of llama.cpp's 256-weight K blocks."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                                      max_position_embeddings=64, tie_word_embeddings=True, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(4.0)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    model = wide_model()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    pool = TokenPool(torch.randint(0, 97, (8, 16), generator=torch.Generator().manual_seed(1)), "random")
    root = tmp_path_factory.mktemp("gguf") / "db"
    manifest = build_gguf_database(Decoder(model), pool, root, TYPES, True, 4, False, "llama", None)
    return model, dense, pool, root, manifest


def space_at(built, target, **options):
    model, dense, _, root, _ = built
    model.load_state_dict(dense)
    return make_space("gguf", Decoder(model), target, {"db": str(root), "tolerance": TOL, **options})


def test_type_names_and_fallback():
    assert parse_types("q4_k, Q8_0") == ("Q4_K", "Q8_0")
    for bad in ("Q4_K,Q9_9", "", "Q4_K,q4_k"):
        with pytest.raises(UserError):
            parse_types(bad)
    assert [fallback(t, 576) for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "Q8_0")] == \
        ["Q4_0", "Q4_0", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "Q8_0"]
    assert fallback("Q4_K", 1536) == "Q4_K" and fallback("Q4_0", 100) == "F16"
    assert tensor_levels(("Q2_K", "Q3_K", "Q6_K"), (8, 576)) == ["Q4_0", "Q8_0"]
    assert tensor_bytes("Q4_K", (3, 512)) == 3 * 2 * 144


def test_database_stores_each_tensor_at_each_type_with_its_imatrix(built):
    model, dense, _, root, manifest = built
    tensors = manifest["tensors"]
    assert len(tensors) == 2 * 7 + 1  # seven linears per block, the tied embedding (also the head)
    emb = tensors["model.embed_tokens"]
    assert (emb["gguf"], emb["kind"], emb["types"]) == ("token_embd.weight", "embedding", list(TYPES))
    assert tensors["model.layers.1.mlp.down_proj"]["gguf"] == "blk.1.ffn_down.weight"
    imatrix = read_imatrix(root / IMATRIX)
    assert set(imatrix) == {t["gguf"] for t in tensors.values()}  # the tied embedding's: the head's inputs
    from safetensors.torch import load_file
    stored = load_file(str(root / "layers" / "model.layers.0.self_attn.q_proj.safetensors"))
    weight = dense["model.layers.0.self_attn.q_proj.weight"].numpy()
    for qtype in TYPES:  # the stored blocks are the quantizer's, with the written imatrix
        expected = quantize(weight, qtype, imatrix["blk.0.attn_q.weight"])
        assert np.array_equal(stored[qtype].numpy(), expected)
    assert not np.array_equal(stored["Q2_K"].numpy(), quantize(weight, "Q2_K", None))  # the imatrix mattered


def test_imatrix_is_the_mean_square_of_each_tensors_inputs(built):
    model, dense, pool, root, _ = built
    model.load_state_dict(dense)
    seen = {}

    def catch(module, args):
        seen["x"] = args[0].reshape(-1, 512).double()

    hook = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(catch)
    with torch.no_grad():
        model(pool.windows)
    hook.remove()
    expected = (seen["x"] ** 2).mean(0).numpy()
    np.testing.assert_allclose(read_imatrix(root / IMATRIX)["blk.1.ffn_down.weight"], expected, rtol=1e-4)


def test_levels_decode_as_llama_cpp_and_cost_their_gguf_bytes(built):
    import gguf

    space = space_at(built, 5.0)
    u = space.units.index("model.layers.1.mlp.up_proj")
    for level, qtype in enumerate(space.types[u]):
        raw = space.raw(u, level)
        assert raw.nbytes == space.level_costs[u][level] == tensor_bytes(qtype, space.shapes[u])
        ours = space.decode(u, level).numpy()
        theirs = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])
        assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))
        assert np.array_equal(dequantize(raw, qtype, space.shapes[u][1]), ours)


def _kl_from_scratch(model, ids, dense_logits):
    logp = torch.log_softmax(model(ids).logits[:, :-1].double(), -1)
    logq = torch.log_softmax(dense_logits[:, :-1].double(), -1)
    return float((logq.exp() * (logq - logp)).sum(-1).mean())


def test_fitness_sees_the_quantized_embedding(built):
    """Two candidates that differ only in the token embedding score as full forwards of each say: the
    stage must embed the tokens anew for each, not once for all (``Space.moves_embeddings``)."""
    space = space_at(built, 5.0)
    _, _, pool, _, _ = built
    e = space.units.index("model.embed_tokens")
    base = list(space.random_config(np.random.default_rng(0)))
    configs = [tuple(base[:e] + [lv] + base[e + 1:]) for lv in range(len(space.types[e]))]
    evaluator = Evaluator(space, pool, FitnessConfig())
    sample = Sample([0, 3, 5, 6], [16] * 4)
    measured = [m.kl for m in evaluator.measure(configs, sample)]
    ids = pool.windows[sample.index]
    space.apply(None)
    with torch.no_grad():
        dense_logits = space.decoder.model(ids).logits
        expected = []
        for c in configs:
            space.apply(c)
            expected.append(_kl_from_scratch(space.decoder.model, ids, dense_logits))
    space.apply(None)
    np.testing.assert_allclose(measured, expected, rtol=1e-3)
    assert len(set(np.round(measured, 6))) == len(configs)  # the embedding's type changes the fitness


def test_budget_window_random_configs_and_mutations(built):
    space = space_at(built, 4.5)
    p = space.problem
    assert p.budget == int(4.5 * space.numel / 8) and p.slack == int(p.budget * TOL)
    assert_mutations_stay_in_the_byte_window(space, 0)
    report = space.budget_report(space.random_config(np.random.default_rng(1)))
    assert report["bytes"] <= p.budget and abs(report["bits_per_weight"] - 4.5) <= 4.5 * TOL
    assert sum(report["tensors_per_type"].values()) == len(space.units)


def test_bad_targets_and_types_are_one_line_errors(built):
    with pytest.raises(UserError, match="above the most expensive"):
        space_at(built, 9.0)
    with pytest.raises(UserError, match="below the cheapest"):
        space_at(built, 2.0)
    with pytest.raises(UserError, match="does not store"):
        space_at(built, 4.0, types="Q5_K,Q8_0")
    space = space_at(built, 4.0, types="Q2_K,Q8_0")
    assert all(ts == ["Q2_K", "Q8_0"] for ts in space.types)


def test_baselines_uniform_and_presets(built):
    space = space_at(built, 4.6, types="Q2_K,Q4_K,Q8_0")
    inputs = BaselineInputs(space, None, built[2], 0, 0)
    config = baselines.uniform(inputs)
    assert set(space.tensor_types(config).values()) == {"Q4_K"}  # 4.5 bpw: the largest type within 4.6
    with pytest.raises(UserError, match="does not offer"):  # Q4_K_M wants Q6_K, which --types left out
        baselines.BASELINES["Q4_K_M"](inputs)
    with pytest.raises(UserError, match="above the budget"):
        baselines.BASELINES["Q6_K"](BaselineInputs(space_at(built, 3.0), None, built[2], 0, 0))
    space = space_at(built, 5.0)
    types = space.tensor_types(baselines.BASELINES["Q4_K_M"](BaselineInputs(space, None, built[2], 0, 0)))
    assert (types["token_embd.weight"], types["blk.1.attn_v.weight"], types["blk.0.attn_v.weight"]) == \
        ("Q6_K", "Q6_K", "Q4_K")  # tied head: Q6_K; attn_v more bits where use_more_bits(i, 2): i = 1
    largest = baselines.largest_preset(BaselineInputs(space, None, built[2], 0, 0))
    made = baselines.available_presets(space)
    assert {"Q2_K", "Q4_K_M", "Q6_K"} <= set(made) and "Q3_K_M" not in made  # Q3_K_M needs Q5_K
    costs = [space.problem.cost(c) for c in made.values()]
    assert space.problem.cost(largest) == max(c for c in costs if c <= space.problem.budget) < max(costs)


def test_pareto_on_an_untied_model_from_the_command_line(tiny_checkpoint, tmp_path, monkeypatch):
    """build (the library: an HF directory has no source GGUF, which only the export needs), then pareto with
    the preset and uniform baselines; the untied head is its own tensor (``output.weight``)."""
    import json

    from evopress.cli import main
    from evopress.data import bos_token, load_pool
    from evopress.models import Hardware

    from .test_pareto import no_plot, pareto_args

    model, text = tiny_checkpoint
    loaded = Hardware().load(str(model))
    pool = load_pool(loaded.tokenizer, str(text), "calibration", 32, 1024, bos_token(loaded.tokenizer, "auto"))
    manifest = build_gguf_database(loaded.decoder, pool, tmp_path / "db", ("Q4_0", "Q5_0", "Q8_0"), True, 8, False,
                                   "llama", None)
    assert manifest["tensors"]["lm_head"]["gguf"] == "output.weight"
    no_plot(monkeypatch)
    args = pareto_args(model, text, tmp_path / "p", targets="5,6") + [
        "--space", "gguf", "--db", str(tmp_path / "db"), "--byte-tolerance", "0.03", "--baselines", "preset,uniform"]
    assert main(args) == 0
    front = json.loads((tmp_path / "p" / "front.json").read_text())
    assert set(front["methods"]) == {"evopress", "preset", "uniform"}
    for t in (5, 6):
        result = json.loads((tmp_path / "p" / f"target-{t}" / "result.json").read_text())
        assert t * (1 - 0.03) <= result["budget"]["bits_per_weight"] <= t
        uniform = json.loads((tmp_path / "p" / "baselines" / "uniform" / f"target-{t}" / "result.json").read_text())
        assert set(uniform["budget"]["tensors_per_type"]) == {"Q4_0" if t == 5 else "Q5_0"}
