"""Golden trajectories: a fixed-seed search of every space gives exactly the pinned levels, and the pinned
fitness values to a tolerance that holds on any x86-64 CPU.

Written before a refactor so that moving code cannot silently change a result. The pinned values live in
``golden_trajectories.json``; regenerate them only for an intended change of results, with
``python tests/test_golden.py [CASE ...]``, and say why in the commit. The test itself only ever compares.

Tolerance: the levels (which candidates won) are discrete and pinned exactly. The fitness values are
float32 sums whose order depends on the CPU's kernels and the thread count. Measured over
``ATEN_CPU_CAPABILITY=default|avx2|avx512`` x 1 and 2 threads on an AVX-512 EPYC, and against the pinned
values from an AVX2-only machine, they differ by at most 5.0e-6 relative (the sparsity case; the others
under 5e-7). ``REL`` is ten times that: loose enough for any CPU, far tighter than any change of what
the search computes (a different sample, level or candidate moves the fitness by 1e-3 or more).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evopress.cli import main

GOLDEN = Path(__file__).with_name("golden_trajectories.json")
REL = 5e-5
SEARCH = ["--generations", "4", "--offspring", "4", "--stages", "2:32,1:64", "--initial-candidates", "3",
          "--initial-tokens", "64", "--final-tokens", "128", "--seed", "3", "--init-from", "none"]
QUANT_DB = ["--space", "quant", "--bits", "2,3,4"]
CASES = {
    "drop": (None, ["--space", "drop", "--target", "0.34"]),
    "sparsity": (["--space", "sparsity", "--target", "0.5", "--levels", "3"], ["--space", "sparsity", "--target", "0.55"]),
    "quant": (QUANT_DB, ["--space", "quant", "--target", "2.5"]),
    "joint": (QUANT_DB, ["--space", "joint", "--target", "3.5", "--byte-tolerance", "0.05"]),
    "width": (["--space", "width", "--mlp-step", "32"], ["--space", "width", "--target", "0.4"]),
}


def trajectory(result: dict) -> dict:
    return {"levels": result["levels"], "fitness": result["fitness"]["kl"],
            "history": [h["fitness"] for h in result["history"]]}


def run_case(space: str, model: Path, text: Path, root: Path) -> dict:
    """The trajectory of the fixed-seed search of ``space`` (building its database first if it has one)."""
    common = ["--model", str(model), "--data", str(text), "--seq-len", "32", "--calib-tokens", "512", "--quiet"]
    build, search = CASES[space]
    if build is not None:
        assert main(["build-db", *build, "--out", str(root / "db"), *common]) == 0
        search = [*search, "--db", str(root / "db")]
    assert main(["search", *search, *SEARCH, "--out", str(root / "run"), *common]) == 0
    return trajectory(json.loads((root / "run" / "result.json").read_text()))


def assert_matches(got: dict, want: dict) -> None:
    assert got["levels"] == want["levels"]
    assert len(got["history"]) == len(want["history"])
    assert got["fitness"] == pytest.approx(want["fitness"], rel=REL)
    assert got["history"] == pytest.approx(want["history"], rel=REL)


@pytest.mark.parametrize("space", list(CASES))
def test_fixed_seed_search_follows_the_golden_trajectory(space, tiny_checkpoint, tmp_path):
    model, text = tiny_checkpoint
    assert_matches(run_case(space, model, text, tmp_path), json.loads(GOLDEN.read_text())[space])


def test_the_tolerance_tells_a_changed_result_apart():
    """A result moved by a change of what the search computes fails; the spread of CPUs does not."""
    want = json.loads(GOLDEN.read_text())["sparsity"]
    spread = {**want, "fitness": want["fitness"] * (1 + 5e-6)}
    assert_matches(spread, want)
    for changed in ({**want, "fitness": want["fitness"] * (1 + 1e-3)},
                    {**want, "levels": [*want["levels"][:-1], want["levels"][-1] + 1]},
                    {**want, "history": want["history"][:-1]}):
        with pytest.raises(AssertionError):
            assert_matches(changed, want)


def test_golden_trajectories_hold_on_generic_kernels_and_one_thread(tmp_path):
    """The goldens under the portable kernels (``ATEN_CPU_CAPABILITY=default``, as on a CPU without AVX) and
    one thread, in a fresh process: the dispatch level is fixed when torch loads."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                           "-k", "follows_the_golden", "--basetemp", str(tmp_path / "t")],
                          env=env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert f"{len(CASES)} passed" in done.stdout


if __name__ == "__main__":
    import tempfile

    from conftest import write_tiny_checkpoint

    goldens = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    for name in sys.argv[1:] or CASES:  # the cases named (all by default); the others keep their pinned values
        with tempfile.TemporaryDirectory() as tmp:
            goldens[name] = run_case(name, *write_tiny_checkpoint(Path(tmp) / "tiny"), Path(tmp))
    GOLDEN.write_text(json.dumps(goldens, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
