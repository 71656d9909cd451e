"""End to end on the embedded default model (SmolLM2-135M from its PyPI package), tiny budgets."""

import json

import pytest

from evopress.cli import main
from evopress.data import documents

pytestmark = pytest.mark.real_model

SMALL = ["--calib-tokens", "2048", "--final-tokens", "256", "--seq-len", "128", "--quiet"]


def test_wiki_calibration_and_evaluation_splits_are_disjoint():
    calib, held_out = documents("wiki", "calibration"), documents("wiki", "evaluation")
    assert len(held_out) > 1500 and len(calib) > 6000
    assert not set(calib) & set(held_out)


def test_search_baseline_eval_report(tmp_path):
    s, b = tmp_path / "search", tmp_path / "shortgpt"
    assert main(["search", "--target", "0.25", "--generations", "2", "--offspring", "4", "--stages", "1:128",
                 "--initial-candidates", "2", "--initial-tokens", "128", "--init-from", "none", "--out", str(s),
                 *SMALL]) == 0
    assert main(["baseline", "--method", "shortgpt", "--target", "0.25", "--tokens", "256",
                 "--out", str(b), *SMALL]) == 0
    result = json.loads((s / "result.json").read_text())
    for key in ("space", "method", "target", "model", "seed", "units", "levels", "budget", "fitness", "history"):
        assert key in result
    assert len(result["units"]) == len(result["levels"]) == 60
    assert sum(result["levels"][:30]) == sum(result["levels"][30:]) == 7  # floor(0.25 * 30)
    assert len(result["history"]) == 3  # initial ranking + 2 generations
    assert result["fitness"]["kl"] > 0
    assert main(["eval", str(s), "--eval-tokens", "512", "--eval-data", "wiki", "--quiet"]) == 0
    ev = json.loads((s / "eval.json").read_text())
    assert ev["ppl"] > ev["dense_ppl"] > 1 and ev["kl"] > 0 and ev["tokens"] == 512 and "windows" in ev["protocol"]
    # resuming a finished search with the same command changes nothing
    before = (s / "result.json").read_text()
    assert main(["search", "--target", "0.25", "--generations", "2", "--offspring", "4", "--stages", "1:128",
                 "--initial-candidates", "2", "--initial-tokens", "128", "--init-from", "none", "--out", str(s),
                 *SMALL]) == 0
    assert json.loads((s / "result.json").read_text())["levels"] == json.loads(before)["levels"]
    assert main(["report", str(s), str(b), "--out", str(tmp_path / "report"), "--quiet"]) == 0
    assert (tmp_path / "report" / "profile.png").stat().st_size > 1000
    assert "shortgpt" in (tmp_path / "report" / "report.md").read_text()


def test_known_bad_configuration_scores_worse_than_a_mild_one_and_dense_scores_zero():
    import numpy as np

    from evopress.pipeline import prepare
    from evopress.recipe import make_recipe

    ctx = prepare(make_recipe(space="drop", target=0.25, seq_len=128, calib_tokens=1024, final_tokens=256,
                              init_from="none"),
                  log=lambda m: None)
    blocks = ctx.space.num_blocks
    keep = [0] * (2 * blocks)
    first_mlp, late_attention = list(keep), list(keep)
    first_mlp[blocks] = 1  # units: attention of blocks 0..L-1, then MLP of blocks 0..L-1
    late_attention[blocks - 2] = 1
    sample = ctx.pool.sample(512, np.random.default_rng(0))
    dense, bad, mild = ctx.evaluator.measure([tuple(keep), tuple(first_mlp), tuple(late_attention)], sample)
    assert abs(dense.kl) < 1e-5  # zero up to float rounding (the teacher ran in other batches, in float64)
    assert bad.kl > 10 * mild.kl > 0
