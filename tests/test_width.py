"""The width space: OBS structure removal, exact budgets, the thinned model, and exports that compute it."""

import json

import numpy as np
import pytest
import torch

from evopress.cli import main
from evopress.compressors.structured import activation_order, kept_columns, obs_prune, structure_columns
from evopress.data import TokenPool
from evopress.errors import UserError
from evopress.evolution import offspring
from evopress.loading import load_compressed
from evopress.models import Decoder
from evopress.spaces.width.build import build_width_database
from evopress.spaces.width.export import export, uniform_shape
from evopress.spaces.width.space import WidthSpace
from evopress.spaces.width.structures import find_units

from .conftest import assert_random_and_mutants_reuse_exactly, logits_under, tiny_model, word_tokenizer


def _layer(seed=0, n=4000, d=48, out=12):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g)
    return x, x.T @ x / n, torch.randn(out, d, generator=g)


def test_obs_snapshot_is_the_least_squares_fit_on_the_kept_columns():
    """Without damping, the OBS-updated weight of any kept set is the optimal reconstruction from those inputs."""
    x, h, w = _layer()
    cols = structure_columns(12, 4)
    order, snaps = obs_prune(w, h, cols, [9, 5], damp=0.0)
    assert sorted(order) == list(range(12))
    for keep in (9, 5):
        kept = kept_columns(order, cols, keep)
        assert snaps[keep].shape == (12, 4 * keep)
        best = torch.linalg.lstsq(x[:, kept].double(), (x @ w.T).double()).solution.T
        assert torch.allclose(snaps[keep].double(), best, atol=1e-3)


def test_obs_removes_less_output_than_activation_ranking_without_update():
    x, h, w = _layer(seed=1)
    cols = structure_columns(48, 1)

    def error(kept, weight):
        return float(((x @ w.T - x[:, kept] @ weight.T) ** 2).mean())

    order, snaps = obs_prune(w, h, cols, [24])
    act = activation_order(h, cols)
    kept_act = kept_columns(act, cols, 24)
    assert error(kept_columns(order, cols, 24), snaps[24]) < 0.5 * error(kept_act, w[:, kept_act])


def test_chunked_removal_hits_every_snapshot():
    _, h, w = _layer(seed=2)
    order, snaps = obs_prune(w, h, structure_columns(48, 1), [40, 7, 0], chunk=5)
    assert sorted(order) == list(range(48)) and sorted(snaps) == [0, 7, 40]


def _pool():
    return TokenPool(torch.randint(0, 97, (12, 16), generator=torch.Generator().manual_seed(1)), "random")


def _width_space(tmp_path, model, target=0.5, method="obs", step=32):
    pool = _pool()
    build_width_database(Decoder(model), pool, tmp_path / "db", method=method, mlp_step=step, batch_size=4,
                         progress=False)
    return WidthSpace(Decoder(model), target, str(tmp_path / "db")), pool


ARCHS = {  # name: (arch, extra config): GQA Llama, plain multi-head Llama, Qwen2 with q/k/v biases
    "llama-gqa": ("llama", {}),
    "llama-mha": ("llama", {"num_key_value_heads": 4}),
    "qwen2-bias": ("qwen2", {}),
}


def _model(name):
    arch, extra = ARCHS[name]
    model = tiny_model(arch, layers=3)
    if extra:
        cfg = model.config.to_dict() | extra
        torch.manual_seed(0)
        model = type(model)(type(model.config)(**cfg))
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2:
                    p.mul_(8.0)
        model.eval().requires_grad_(False)
    return model


@pytest.mark.parametrize("name", list(ARCHS))
def test_levels_budget_and_search_moves(name, tmp_path):
    model = _model(name)
    space, pool = _width_space(tmp_path, model)
    heads, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    attn = [u for u in space.wunits if u.kind == "attention"]
    assert all(u.widths == tuple(range(kv + 1)) for u in attn)
    assert all(u.widths == (0, 32, 64) for u in space.wunits if u.kind == "mlp")
    # one KV group: its query heads' q rows, its k and v rows, the o columns they feed
    hidden = model.config.hidden_size
    hd = hidden // heads
    bias = hd * (heads // kv + 2) if name == "qwen2-bias" else 0
    assert attn[0].params(1) == hidden * hd * (2 * heads // kv + 2) + bias
    assert space.total == sum(p.numel() for n, p in model.model.layers.named_parameters() if "proj" in n)
    p = space.problem
    assert p.budget == space.total // 2 and p.slack == max(attn[0].params(1), 32 * 3 * hidden)
    uniform = space.uniform_config()
    assert p.budget - p.slack <= p.cost(uniform) <= p.budget
    rng = np.random.default_rng(0)
    parent = space.random_config(rng)
    for child in offspring(parent, p, rng, 8, 3):
        assert p.budget - p.slack <= p.cost(child) <= p.budget
        assert space.size_bytes(child) == 4 * p.cost(child)  # fp32
    assert_random_and_mutants_reuse_exactly(space, pool, randoms=3, mutants=3)


def _export_and_reload(space, config, out):
    ids, want = logits_under(space, config)
    summary = export(space, config, out, word_tokenizer())
    got = load_compressed(out)(ids).logits
    return summary, want, got


@pytest.mark.parametrize("name", list(ARCHS))
def test_a_non_uniform_export_computes_the_searched_model(name, tmp_path):
    model = _model(name)
    space, _ = _width_space(tmp_path, model)
    config = space.random_config(np.random.default_rng(3))
    config = (0,) + config[1:] if space.wunits[0].widths[0] == 0 else config  # block 0's attention removed
    summary, want, got = _export_and_reload(space, config, tmp_path / "out")
    assert not summary["plain_checkpoint"]
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    loaded = load_compressed(tmp_path / "out")
    assert sum(p.numel() for n, p in loaded.model.layers.named_parameters() if "proj" in n) == \
        space.problem.cost(config)


def test_a_uniform_profile_exports_a_plain_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _model("llama-mha")  # 4 heads, 64 channels: keep 2 heads and 32 channels everywhere
    space, _ = _width_space(tmp_path, model)
    config = tuple(u.widths.index(2 if u.kind == "attention" else 32) for u in space.wunits)
    assert uniform_shape(space, config) == (2, 32)
    summary, want, _ = _export_and_reload(space, config, tmp_path / "out")
    assert summary["plain_checkpoint"]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert (plain.config.num_attention_heads, plain.config.num_key_value_heads, plain.config.intermediate_size) == \
        (2, 2, 32)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(plain(ids).logits, want, atol=1e-4, rtol=1e-4)


def test_chunked_removal_costs_little_output_error():
    """The database removes 1/256 of the channels per OBS step (``build.chunk``): measured here on a
    correlated synthetic layer, the output error at half the channels stays within 1% of exact greedy."""
    g = torch.Generator().manual_seed(4)
    n = 256
    x = torch.randn(2048, 64, generator=g) @ torch.randn(64, n, generator=g) * torch.rand(n, generator=g) ** 3
    x = x + 0.1 * torch.randn(2048, n, generator=g)
    h, w, cols = x.T @ x / len(x), torch.randn(32, n, generator=g), structure_columns(n, 1)

    def error(chunk):
        order, snaps = obs_prune(w, h, cols, [n // 2], chunk=chunk)
        kept = kept_columns(order, cols, n // 2)
        return float(((x @ w.T - x[:, kept] @ snaps[n // 2].T) ** 2).mean())

    exact, chunked = error(1), error(8)
    assert exact <= chunked * 1.001 and chunked < 1.01 * exact


def test_the_cli_builds_searches_baselines_and_exports(tiny_checkpoint, tmp_path):
    model, text = tiny_checkpoint
    common = ["--model", str(model), "--data", str(text), "--seq-len", "32", "--calib-tokens", "512", "--quiet"]
    assert main(["build-db", "--space", "width", "--mlp-step", "32", "--out", str(tmp_path / "db"), *common]) == 0
    manifest = json.loads((tmp_path / "db" / "manifest.json").read_text())
    assert manifest["method"] == "obs" and len(manifest["layers"]) == 12
    space = ["--space", "width", "--target", "0.4", "--db", str(tmp_path / "db"), "--tokens", "128"]
    assert main(["search", *space, "--generations", "2", "--offspring", "4", "--stages", "1:64",
                 "--initial-tokens", "64", "--final-tokens", "128", "--out", str(tmp_path / "run"), *common]) == 0
    assert main(["baseline", *space, "--method", "uniform", "--final-tokens", "128", "--out", str(tmp_path / "base"),
                 *common]) == 0
    assert main(["baseline", *space, "--method", "shortgpt", "--final-tokens", "128", "--out", str(tmp_path / "sg"),
                 *common]) == 0
    for run in ("sg", "base", "run"):
        budget = json.loads((tmp_path / run / "result.json").read_text())["budget"]
        assert budget["lowest"] <= budget["kept_parameters"] <= budget["budget"] == int(0.6 * budget["parameters"])
        if run == "sg":  # depth pruning: whole blocks removed, one block partly restored, the rest untouched
            widths = list(zip(budget["kv_groups_kept"], budget["mlp_channels_kept"]))
            assert (0, 0) in widths and sum(w not in ((0, 0), (2, 64)) for w in widths) <= 1
    assert main(["import-config", str(tmp_path / "run" / "config.txt"), "--space", "width", "--db", str(tmp_path / "db"),
                 "--final-tokens", "128", "--out", str(tmp_path / "imp"), *common]) == 0  # target read off the file
    imported = json.loads((tmp_path / "imp" / "result.json").read_text())
    searched = json.loads((tmp_path / "run" / "result.json").read_text())
    assert imported["levels"] == searched["levels"] and imported["budget"]["target"] == 0.4
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "exp"), "--quiet"]) == 0
    profile = json.loads((tmp_path / "exp" / "evopress_profile.json").read_text())
    levels = json.loads((tmp_path / "run" / "result.json").read_text())["levels"]
    assert len(profile["kv_groups_kept"]) == 6 and len(levels) == 12
    exported = load_compressed(tmp_path / "exp")
    kept = sum(p.numel() for n, p in exported.model.layers.named_parameters() if "proj" in n)
    assert kept == budget["kept_parameters"]  # the search's result: the last budget read above


@pytest.mark.parametrize("args,message", [
    (["build-db", "--space", "width", "--mlp-step", "33"], "multiple of 32"),
    (["build-db", "--space", "width", "--method", "wanda"], "unknown --method 'wanda' for width"),
    (["search", "--space", "width", "--target", "1.0", "--db", "nowhere"], "width targets are the fraction"),
])
def test_bad_width_input_is_one_line_exit_2(args, message, tiny_checkpoint, tmp_path, capsys):
    model, text = tiny_checkpoint
    out = ["--out", str(tmp_path / "x")]
    assert main([*args, *out, "--model", str(model), "--data", str(text), "--seq-len", "32", "--calib-tokens", "512",
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_fused_projections_are_refused_by_name():
    with pytest.raises(UserError, match="fused projections"):
        find_units(Decoder(tiny_model("phi3", layers=2)), 32)


def test_a_bf16_model_gets_bf16_levels_and_a_bf16_export(tmp_path):
    from safetensors.torch import load_file

    model = _model("llama-gqa").to(torch.bfloat16)
    space, _ = _width_space(tmp_path, model)
    stored = load_file(str(tmp_path / "db" / "layers" / "model.layers.0.mlp.down_proj.safetensors"))
    assert stored["32.weight"].dtype == torch.bfloat16 and stored["order"].dtype == torch.int32
    config = space.random_config(np.random.default_rng(1))
    space.apply(config)
    assert all(layer.weight.dtype == torch.bfloat16 for layer in space.layers)
    ids, want = logits_under(space, config)
    export(space, config, tmp_path / "out", word_tokenizer())
    got = load_compressed(tmp_path / "out", dtype=torch.bfloat16)(ids).logits
    assert got.dtype == want.dtype == torch.bfloat16
    assert torch.allclose(got.float(), want.float(), atol=0.1, rtol=0.02)


def test_a_depth_profile_reads_as_a_width_profile_and_starts_a_search(tiny_checkpoint, tmp_path, capsys):
    """The depth space's file (two whole blocks and one attention dropped) in the width space: those units at width
    0, the rest full; written back identically; and as ``--init-from FILE``, repaired into the search's window."""
    model, text = tiny_checkpoint
    common = ["--model", str(model), "--data", str(text), "--seq-len", "32", "--calib-tokens", "512", "--quiet"]
    assert main(["build-db", "--space", "width", "--mlp-step", "32", "--out", str(tmp_path / "db"), *common]) == 0
    depth = tmp_path / "layer_drop_config.txt"
    depth.write_text("none\nattn\nnone\nnone\nattn+mlp\nattn+mlp\n")
    db = ["--db", str(tmp_path / "db")]
    assert main(["import-config", str(depth), "--space", "width", *db, "--final-tokens", "128",
                 "--out", str(tmp_path / "imp"), *common]) == 0
    levels = json.loads((tmp_path / "imp" / "result.json").read_text())["levels"]
    assert levels == [2, 2, 0, 2, 2, 2, 2, 2, 0, 0, 0, 0]  # attention, MLP per block; 0 removes
    assert main(["export-config", str(tmp_path / "imp"), "--format", "reference-drop", "--out",
                 str(tmp_path / "back.txt")]) == 0
    assert (tmp_path / "back.txt").read_text() == depth.read_text()
    assert main(["search", "--space", "width", "--target", "0.5", *db, "--init-from", str(depth), "--generations", "1",
                 "--offspring", "2", "--stages", "1:64", "--initial-tokens", "64", "--final-tokens", "128",
                 "--out", str(tmp_path / "run"), *common[:-1]]) == 0
    assert f"the '{depth}' configuration costs" in capsys.readouterr().err  # 0.5 removes more: repaired
    assert json.loads((tmp_path / "run" / "result.json").read_text())["recipe"]["init_from"] == [str(depth)]
    assert main(["search", "--space", "width", "--target", "0.5", *db, "--init-from", str(tmp_path / "none.txt"),
                 "--out", str(tmp_path / "bad"), *common]) == 2
