"""finalize: a chosen profile re-solved block by block on the finalized model's own inputs."""

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from evopress.compressors.gptq import QuantGrid, QuantizedWeight, gptq_quantize
from evopress.compressors.hessian import HessianAccumulator
from evopress.compressors.sparsegpt import sparsegpt_prune_levels
from evopress.data import TokenPool
from evopress.database import layer_file
from evopress.models import Decoder
from evopress.spaces import get_plugin
from evopress.spaces.finalize import finalize_layers
from evopress.spaces.quant.export import read_compressed_weights
from evopress.spaces.quant.space import QuantSpace
from evopress.spaces.sparsity.space import SparsitySpace
from evopress.spaces.sparsity.storage import encode_level

from .conftest import tiny_model, tiny_quant_database, tiny_sparsity_database


LLAMA_GROUPS = [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)]


def sequential_reference(model, pool, solve, true_sequential=False):
    """The block-sequential solve, written out: block b's layer inputs come from a full forward of the model
    whose blocks before b are already solved (and installed), in the batches the database uses; with
    ``true_sequential``, one Llama layer group after another within the block too."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    steps = [(b, [n for n in names if f".layers.{b}." in n and n.rsplit(".", 1)[1] in group])
             for b in range(model.config.num_hidden_layers)
             for group in (LLAMA_GROUPS if true_sequential else [sum(LLAMA_GROUPS, ())])]
    solved = {}
    for b, block in steps:
        accs = {n: HessianAccumulator(model.get_submodule(n).in_features) for n in block}
        hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, acc=accs[n]: acc.add(a[0]))
                 for n in block]
        with torch.no_grad():
            for s in range(0, len(pool.windows), 4):
                model(pool.windows[s:s + 4])
        for h in hooks:
            h.remove()
        for n in block:
            layer = model.get_submodule(n)
            solved[n], weight = solve(n, layer.weight, accs[n].hessian())
            layer.weight.data = weight
    return solved


def quant_case(tmp_path):
    model, dense, pool, root, manifest = tiny_quant_database(tmp_path, 3, (2, 3, 4))
    space = QuantSpace(Decoder(model), 3.0, db=str(root))
    config = space.random_config(np.random.default_rng(0))
    bits = space.layer_bits(config)

    def solve(name, weight, H):
        q = gptq_quantize(weight, H, QuantGrid(bits[name], manifest["group_size"]), damp=manifest["damp"],
                          act_order=manifest["act_order"])
        return {f"{bits[name]}.{k}": v for k, v in q.to_packed().items()}, q.dequantize()

    return space, config, pool, dense, solve


def sparsity_case(tmp_path):
    model = tiny_model(layers=3)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    pool = TokenPool(torch.randint(0, 97, (12, 16), generator=torch.Generator().manual_seed(1)), "random")
    tiny_sparsity_database(tmp_path / "s", model, pool)
    space = SparsitySpace(Decoder(model), 0.5, db=str(tmp_path / "s"))
    config = space.random_config(np.random.default_rng(0))
    level = {name: (space.first_offsets[u] + lv, space.zeros[u][lv])
             for u, (name, lv) in enumerate(zip(space.units, config))}

    def solve(name, weight, H):
        offset, zeros = level[name]
        pruned = sparsegpt_prune_levels(weight, H, [zeros], damp=space.db.manifest["damp"])[0]
        return encode_level(offset, pruned), pruned.half().float()

    return space, config, pool, dense, solve


@pytest.mark.parametrize("case, true_sequential", [(quant_case, False), (sparsity_case, False), (quant_case, True)])
def test_finalized_levels_equal_a_block_sequential_solve(case, true_sequential, tmp_path):
    """Every re-solved layer equals the sequential solve written out above, the stitched database level
    differs from it (the inputs differ), and the space reads the overlay as a database: the chosen levels
    from the overlay, every other level from the base."""
    space, config, pool, dense, solve = case(tmp_path)
    name = space.name
    base, jobs = get_plugin(name).finalize(space, config)
    finalize_layers(space.decoder, pool, base, jobs, tmp_path / "fin", batch_size=4, progress=False,
                    true_sequential=true_sequential)
    assert all(torch.equal(m.weight, dense[f"{n}.weight"]) for n, m in space.decoder.linear_layers().items())

    reference_model = tiny_model(layers=3)
    reference_model.load_state_dict(dense)
    reference = sequential_reference(reference_model, pool, solve, true_sequential)
    stitched_differs = 0
    for n, tensors in reference.items():
        ours = load_file(str(layer_file(tmp_path / "fin", n)))
        assert set(ours) == set(tensors)
        for k, v in tensors.items():
            assert torch.equal(ours[k], v), (n, k)
        stitched = space.db.read(n, list(tensors))
        stitched_differs += any(not torch.equal(stitched[k], v) for k, v in tensors.items())
    assert stitched_differs > len(reference) // 2

    overlay = type(space)(space.decoder, space.target, db=str(tmp_path / "fin"))
    assert overlay.db.base is not None and overlay.db.base.root == space.db.root
    for u in range(len(space.units)):
        other = (config[u] + 1) % space.problem.num_levels[u]
        assert torch.equal(overlay.decode(u, config[u]), reference_model.get_submodule(space.units[u]).weight)
        assert torch.equal(overlay.decode(u, other), space.decode(u, other))


def test_cli_finalize_eval_report_export_resume_and_refusals(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """``evopress finalize`` writes a result marked finalized with the same profile and budget, which eval,
    report and export take; a killed finalize resumes without solving finished layers again; bad input
    is one line and exit 2."""
    import evopress.spaces.quant.finalize as qf
    from evopress.cli import main

    model, text = tiny_checkpoint
    common = ["--model", str(model), "--data", str(text), "--seq-len", "32", "--quiet"]
    db = tmp_path / "db"
    assert main(["build-db", "--space", "quant", "--bits", "2,3,4", "--calib-tokens", "512", "--out", str(db),
                 *common]) == 0
    run = ["--calib-tokens", "512", "--final-tokens", "128", "--tokens", "64", *common]
    assert main(["baseline", "--method", "dp", "--target", "2.5", "--space", "quant", "--db", str(db),
                 "--out", str(tmp_path / "dp"), *run]) == 0
    assert main(["baseline", "--method", "angular", "--target", "0.25", "--space", "drop",
                 "--out", str(tmp_path / "depth"), *run]) == 0
    capsys.readouterr()

    calls = []
    solve = qf.gptq_quantize_levels

    def killed_after_five(*args, **kwargs):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(1)
        return solve(*args, **kwargs)

    finalize = ["finalize", str(tmp_path / "dp"), "--out", str(tmp_path / "fin"), "--calib-tokens", "512", "--quiet"]
    monkeypatch.setattr(qf, "gptq_quantize_levels", killed_after_five)
    assert main(finalize) == 130  # "interrupted", as a Ctrl-C or a kill mid-block
    assert not (tmp_path / "fin" / "result.json").exists()
    monkeypatch.setattr(qf, "gptq_quantize_levels", lambda *a, **k: calls.append(1) or solve(*a, **k))
    assert main(finalize) == 0
    layers = len(json.loads((db / "manifest.json").read_text())["layers"])
    assert len(calls) == layers  # five before the kill, the rest after: none solved twice

    stitched, final = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("dp", "fin"))
    assert final["levels"] == stitched["levels"] and final["budget"] == stitched["budget"]
    assert final["finalized"]["from"] == str((tmp_path / "dp").resolve())
    assert final["finalized"]["stitched_fitness"] == stitched["fitness"]
    assert final["space_options"]["db"] == str((tmp_path / "fin" / "db").resolve())
    assert final["fitness"]["kl"] != stitched["fitness"]["kl"]
    assert main(finalize) == 0 and len(calls) == layers  # a rerun of a finished finalize solves nothing

    assert main(["eval", str(tmp_path / "dp"), str(tmp_path / "fin"), "--eval-data", str(text),
                 "--eval-tokens", "256", "--eval-seq-len", "32", "--quiet"]) == 0
    assert main(["report", str(tmp_path / "dp"), str(tmp_path / "fin"), "--out", str(tmp_path / "report"),
                 "--quiet"]) == 0
    table = (tmp_path / "report" / "report.md").read_text()
    assert "| dp |" in table and "| dp, finalized |" in table
    assert main(["export", str(tmp_path / "fin"), "--out", str(tmp_path / "export"), "--quiet"]) == 0
    exported = read_compressed_weights(tmp_path / "export")
    name, bits = final["units"][0], final["space_options"]["bits"][final["levels"][0]]
    level = load_file(str(layer_file(tmp_path / "fin" / "db", name)))
    grid = QuantGrid(bits, json.loads((db / "manifest.json").read_text())["group_size"])
    solved = QuantizedWeight.from_packed({k: level[f"{bits}.{k}"] for k in ("codes", "scales", "zeros")},
                                         tuple(exported[f"{name}.weight"].shape), grid)
    assert torch.equal(exported[f"{name}.weight"], solved.dequantize())  # the export writes the finalized level
    # export --finalize: finalize beside the result, then export that; the same model as above
    assert main(["export", str(tmp_path / "dp"), "--finalize", "--calib-tokens", "512", "--out",
                 str(tmp_path / "export2"), "--quiet"]) == 0
    assert json.loads((tmp_path / "dp-finalized" / "result.json").read_text())["finalized"]
    assert (tmp_path / "export2" / "model.safetensors").read_bytes() == \
        (tmp_path / "export" / "model.safetensors").read_bytes()
    # a recipe's finalize section, then its eval section on the finalized result
    recipe = {"space": "quant", "method": "dp", "target": 2.5, "space_options": {"db": str(db)}, "model": str(model),
              "data": str(text), "seq_len": 32, "calib_tokens": 512, "final_tokens": 128, "baseline_tokens": 64,
              "out": str(tmp_path / "r"), "finalize": {"calib_tokens": 512},
              "eval": {"data": [str(text)], "tokens": 256, "seq_len": 32}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["run", str(tmp_path / "recipe.yaml"), "--quiet"]) == 0
    assert json.loads((tmp_path / "r-finalized" / "eval.json").read_text())
    assert json.loads((tmp_path / "r-finalized" / "result.json").read_text())["levels"] == stitched["levels"]
    capsys.readouterr()

    for argv, message in (
            (["finalize", str(tmp_path / "depth"), "--out", str(tmp_path / "x")], "nothing to re-solve"),
            (["finalize", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")], "not found"),
            (["finalize", str(tmp_path / "dp"), "--out", str(tmp_path / "dp")], "the result itself"),
            (["finalize", str(tmp_path / "dp"), "--out", str(db)], "a level database this result reads"),
            (["finalize", str(tmp_path / "dp"), "--calib-tokens", "0", "--out", str(tmp_path / "x")],
             "at least one window"),
            (["finalize", str(tmp_path / "fin"), "--out", str(tmp_path / "x")], "already finalized"),
            (["export", str(tmp_path / "dp"), "--calib-tokens", "9", "--out", str(tmp_path / "x")], "for --finalize")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_joint_finalize_keeps_drops_and_resolves_kept_layers(tmp_path):
    """A joint profile: dropped sub-blocks stay dropped while the kept layers are solved (their layers are no
    jobs, and the next blocks' inputs are those of the model without them), so a kept layer after a drop
    differs from the same profile finalized with nothing dropped."""
    from evopress.spaces import make_space

    model, dense, pool, root, _ = tiny_quant_database(tmp_path, 4, (2, 3, 4))
    space = make_space("joint", Decoder(model), 3.0, {"db": str(root), "tolerance": 0.05})
    config = list(space.random_config(np.random.default_rng(0)))
    first_attn = space.layers  # the first sub-block unit: block 0's attention
    config[first_attn] = 1
    base, jobs = get_plugin("joint").finalize(space, tuple(config))
    dropped = [space.units[u] for u in range(space.layers) if not space.problem.active(tuple(config), u)]
    assert dropped and not set(dropped) & set(jobs) and len(jobs) == space.layers - len(dropped)
    finalize_layers(space.decoder, pool, base, jobs, tmp_path / "drop", batch_size=4, progress=False)
    space.apply(None)
    overlay = make_space("joint", space.decoder, 3.0, {"db": str(tmp_path / "drop"), "tolerance": 0.05})
    u = space.units.index(dropped[0])  # no layer file in the overlay: every level from the base
    assert not layer_file(tmp_path / "drop", dropped[0]).exists()
    assert torch.equal(overlay.quant.decode(u, 0), space.quant.decode(u, 0))
    # the sub-blocks are restored: now the same layers are solved with nothing dropped
    kept = list(jobs)
    quant = get_plugin("quant").finalize(space.quant, tuple(config[:space.layers]))[1]
    finalize_layers(space.decoder, pool, base, {n: quant[n] for n in kept}, tmp_path / "all", batch_size=4,
                    progress=False)
    later = [n for n in kept if ".layers.0." not in n]
    differs = [n for n in later if not torch.equal(*(load_file(str(layer_file(tmp_path / d, n)))[jobs[n].keys[0]]
                                                     for d in ("drop", "all")))]
    assert len(differs) > len(later) // 2
