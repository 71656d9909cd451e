"""Golden trajectories: a fixed-seed search of every space gives exactly the pinned levels and fitness.

Written before a refactor so that moving code cannot silently change a result. The pinned values
live in ``golden_trajectories.json``; regenerate them only for an intended change of results, with
``EVOPRESS_WRITE_GOLDEN=1 pytest tests/test_golden.py``, and say why in the commit.
"""

import json
import os
from pathlib import Path

import pytest

from evopress.cli import main

GOLDEN = Path(__file__).with_name("golden_trajectories.json")
SEARCH = ["--generations", "4", "--offspring", "4", "--stages", "2:32,1:64", "--initial-candidates", "3",
          "--initial-tokens", "64", "--final-tokens", "128", "--seed", "3", "--init-from", "none"]
CASES = {
    "drop": (None, ["--space", "drop", "--target", "0.34"]),
    "sparsity": (["--space", "sparsity", "--target", "0.5", "--levels", "3"], ["--space", "sparsity", "--target", "0.55"]),
    "quant": (["--space", "quant", "--bits", "2,3,4"], ["--space", "quant", "--target", "2.5"]),
}


def trajectory(result: dict) -> dict:
    return {"levels": result["levels"], "fitness": result["fitness"]["kl"],
            "history": [h["fitness"] for h in result["history"]]}


@pytest.mark.parametrize("space", list(CASES))
def test_fixed_seed_search_follows_the_golden_trajectory(space, tiny_checkpoint, tmp_path):
    model, text = tiny_checkpoint
    common = ["--model", str(model), "--data", str(text), "--seq-len", "32", "--calib-tokens", "512", "--quiet"]
    build, search = CASES[space]
    if build is not None:
        assert main(["build-db", *build, "--out", str(tmp_path / "db"), *common]) == 0
        search = [*search, "--db", str(tmp_path / "db")]
    assert main(["search", *search, *SEARCH, "--out", str(tmp_path / "run"), *common]) == 0
    got = trajectory(json.loads((tmp_path / "run" / "result.json").read_text()))
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    if os.environ.get("EVOPRESS_WRITE_GOLDEN"):
        golden[space] = got
        GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
    want = golden[space]
    assert got["levels"] == want["levels"]
    assert got["fitness"] == pytest.approx(want["fitness"], rel=1e-6)
    assert got["history"] == pytest.approx(want["history"], rel=1e-6)
