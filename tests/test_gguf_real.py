"""Gguf space end to end on the embedded default model: build-db, search, baseline and export from the command
line (pareto: test_gguf.py, on a tiny checkpoint), and the exported file run by transformers (same logits) and by
llama.cpp (the same greedy tokens)."""

import json

import numpy as np
import pytest
import torch

from evopress.cli import main
from evopress.models import Hardware
from evopress.spaces import make_space

pytestmark = pytest.mark.real_model
pytest.importorskip("libgguf", reason="the gguf extra (libgguf) is not installed; make test installs it")

SMALL = ["--calib-tokens", "1024", "--seq-len", "128", "--quiet"]
SEARCH = ["--generations", "1", "--offspring", "4", "--stages", "1:128", "--final-tokens", "256", "--tokens", "256",
          "--initial-candidates", "2", "--initial-tokens", "128", "--track-every", "0"]
# Q4_K and Q6_K land only on ffn_down (1536-wide rows); the 576-wide tensors fall back to Q5_0 and Q8_0
TYPES = "Q4_0,Q4_K,Q6_K,Q8_0"
TEXT = ("The history of the city begins in the Roman era, when a small fort was built on the river crossing. "
        "Over the following centuries it grew into a market town, and in the nineteenth century the railway "
        "made it an industrial centre known for textiles and machinery.")


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-real") / "db"
    # without an imatrix: its 576-wide legacy types take seconds each with one (the imatrix: test_gguf.py)
    assert main(["build-db", "--space", "gguf", "--types", TYPES, "--no-imatrix", "--out", str(root), *SMALL]) == 0
    return root


def test_database_levels_follow_llama_cpps_fallback(db):
    manifest = json.loads((db / "manifest.json").read_text())
    tensors = manifest["tensors"]
    assert tensors["model.layers.0.self_attn.q_proj"]["types"] == ["Q4_0", "Q5_0", "Q8_0"]
    assert tensors["model.layers.0.mlp.down_proj"]["types"] == ["Q4_0", "Q4_K", "Q6_K", "Q8_0"]
    assert tensors["model.embed_tokens"]["gguf"] == "token_embd.weight"  # tied: also the head
    assert manifest["presets"]["Q4_K_M"]["missing_types"] == [] and not manifest["imatrix"]


def test_search_baseline_export_and_llama_cpp_runs_it(db, tmp_path):
    q4km = json.loads((db / "manifest.json").read_text())["presets"]["Q4_K_M"]["bits_per_weight"]
    common = ["--space", "gguf", "--db", str(db), "--target", str(q4km)]
    assert main(["search", *common, *SEARCH, "--out", str(tmp_path / "s"), *SMALL]) == 0
    assert main(["baseline", *common, "--method", "Q4_K_M", "--tokens", "256", "--final-tokens", "256", "--out", str(tmp_path / "b"), *SMALL]) == 0
    searched = json.loads((tmp_path / "s" / "result.json").read_text())
    preset = json.loads((tmp_path / "b" / "result.json").read_text())
    assert searched["budget"]["bytes"] <= preset["budget"]["budget_bytes"]
    assert preset["budget"]["tensors_per_type"] == {"Q4_K": 16, "Q5_0": 166, "Q6_K": 14, "Q8_0": 15}

    out = tmp_path / "export"
    assert main(["export", str(tmp_path / "s"), "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "evopress_profile.json").read_text())
    assert sum(summary["budget"]["tensors_per_type"].values()) == 211
    command = (out / "llama-quantize.txt").read_text()
    assert command.startswith("llama-quantize --tensor-type") and command.count("--tensor-type") == 210

    # the exported file read back by transformers (gguf-py's dequantizer): the very weights the search scored
    from transformers import AutoModelForCausalLM

    loaded = Hardware().load(None)
    space = make_space("gguf", loaded.decoder, searched["target"], searched["space_options"])
    ids = loaded.tokenizer(TEXT, return_tensors="pt").input_ids
    space.apply(tuple(searched["levels"]))
    with torch.no_grad():
        ours = loaded.model(ids).logits[0]
        theirs = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)(ids).logits[0]
    space.apply(None)
    assert torch.equal(ours, theirs)

    # llama.cpp itself: greedy next tokens over the text agree with ours (it also quantizes activations)
    pytest.importorskip("xllamacpp", reason="the gguf-runtime extra (xllamacpp) is not installed")
    from evopress.spaces.gguf.runtime import server, teacher_forced_top1

    agree = np.mean(np.array(teacher_forced_top1(server(out / "model.gguf"), ids[0].tolist())) ==
                    ours[:-1].argmax(-1).numpy())
    assert agree >= 0.85, agree  # measured 0.94 on a 5.4-bit mix


@pytest.mark.parametrize("args, message", [
    (["--model", "MODEL"], "convert_hf_to_gguf.py"),  # an HF directory: no converter on the package index
    (["--types", "Q4_K,TQ1_0"], "not a llama.cpp quant type this space can place"),
    (["--types", "IQ2_XS,Q4_K", "--no-imatrix"], "need an importance matrix"),
])
def test_bad_build_input_is_one_line_exit_2(args, message, tiny_checkpoint, tmp_path, capsys):
    model, text = tiny_checkpoint
    args = [str(model) if a == "MODEL" else a for a in args]
    assert main(["build-db", "--space", "gguf", *args, "--data", str(text), "--out", str(tmp_path / "db"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
