"""Two gloo processes give exactly the single-process result (search, recipe files, the Python API);
ranks started differently stop at once, each with one line; a dead rank ends the run, no hang."""

import json
import os
import runpy
import shutil
import socket
import subprocess
import sys
import time

import pytest

from .test_reliability import comparable, search_args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argvs, timeout="60"):
    """One process per entry of ``argvs`` (python's arguments), with the environment torchrun gives them."""
    port, world = free_port(), len(argvs)
    procs = []
    for r, argv in enumerate(argvs):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "RANK": str(r), "LOCAL_RANK": str(r),
               "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "EVOPRESS_DIST_TIMEOUT": timeout}
        procs.append(subprocess.Popen([sys.executable, *argv], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def cli(args):
    return ["-m", "evopress", *args]


def finish(procs, timeout=240):
    """(returncode, stdout, stderr) of every rank; none is left running."""
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def assert_same_run(two_dir, one_dir):
    """The result of two processes is the single-process one, on the device the group pinned."""
    one, two = comparable(one_dir), comparable(two_dir)
    assert two["recipe"].pop("device") == "cpu"  # torchrun ranks pin their device
    one["recipe"].pop("device")
    assert two == one


def test_two_processes_equal_one(tiny_checkpoint, tmp_path):
    from evopress.cli import main

    model, text = tiny_checkpoint
    assert main(search_args(model, text, tmp_path / "one", 4)) == 0
    for rc, _, err in finish(launch([cli(search_args(model, text, tmp_path / "two", 4))] * 2)):
        assert rc == 0, err
    assert_same_run(tmp_path / "two", tmp_path / "one")


def test_a_dead_rank_ends_the_run_with_an_error(tiny_checkpoint, tmp_path):
    model, text = tiny_checkpoint
    out = tmp_path / "dead"
    procs = launch([cli(search_args(model, text, out, 400))] * 2, timeout="30")
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoint.json").is_file():
        time.sleep(0.05)
    assert (out / "checkpoint.json").is_file()
    procs[1].kill()
    start = time.time()
    _, err = procs[0].communicate(timeout=90)
    assert procs[0].returncode != 0
    assert time.time() - start < 60
    assert "distributed run failed" in err
    assert json.loads((out / "checkpoint.json").read_text())["state"]["generation"] < 400


def test_a_recipe_file_under_two_processes_equals_one(tiny_checkpoint, tmp_path):
    from evopress.cli import main

    model, text = tiny_checkpoint
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
space: drop
target: 0.34
model: {model}
data: {text}
seq_len: 32
calib_tokens: 1024
final_tokens: 128
baseline_tokens: 128
search: {{generations: 2, offspring: 4, stages: [[2, 32], [1, 64]], initial_candidates: 4, initial_tokens: 64}}
eval: {{data: [{text}], tokens: 128, seq_len: 32}}
""")
    assert main(["run", str(recipe), "--out", str(tmp_path / "one"), "--quiet"]) == 0
    for rc, _, err in finish(launch([cli(["run", str(recipe), "--out", str(tmp_path / "two"), "--quiet"])] * 2)):
        assert rc == 0, err
    assert_same_run(tmp_path / "two", tmp_path / "one")
    assert (tmp_path / "two" / "eval.json").read_text() == (tmp_path / "one" / "eval.json").read_text()
    assert json.loads((tmp_path / "two" / "recipe.json").read_text())["init_from"] == ["shortgpt", "angular"]


API_SCRIPT = """
import json, sys
import evopress

model, text, out = sys.argv[1:]
common = dict(space="drop", target=0.34, model=model, data=text, seq_len=32, calib_tokens=1024, final_tokens=128)
search = evopress.search(out + "/search", generations=2, offspring=4, stages=[(2, 32), (1, 64)],
                         initial_candidates=4, initial_tokens=64, init_from="none", progress=False, **common)
random = evopress.baseline(out + "/random", method="random", baseline_tokens=64, random_candidates=6, **common)
print("RESULT", json.dumps([search.levels, search.fitness, random.levels, random.fitness]))
"""


def test_the_python_api_under_two_processes_equals_one(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """A script calling evopress.search then evopress.baseline: each call is one run of both ranks."""
    model, text = tiny_checkpoint
    script = tmp_path / "script.py"
    script.write_text(API_SCRIPT)
    monkeypatch.setattr(sys, "argv", [str(script), str(model), str(text), str(tmp_path / "one")])
    runpy.run_path(str(script), run_name="__main__")
    one = capsys.readouterr().out.splitlines()[-1]
    ranks = finish(launch([[str(script), str(model), str(text), str(tmp_path / "two")]] * 2))
    for rc, _, err in ranks:
        assert rc == 0, err
    assert ranks[0][1].splitlines()[-1] == ranks[1][1].strip() == one  # every rank returns it; rank 1 logs nothing
    for run in ("search", "random"):
        assert_same_run(tmp_path / "two" / run, tmp_path / "one" / run)


@pytest.fixture(scope="module")
def two_checkpoints(tiny_checkpoint, tmp_path_factory):
    """Checkpoints of seeds 0 and 1 to resume from: searches stopped before their result (finished.json)."""
    from evopress.cli import main

    model, text = tiny_checkpoint
    root = tmp_path_factory.mktemp("checkpoints")
    for seed in (0, 1):
        assert main(resume_args(model, text, root, seed, seed)) == 0
        (root / f"seed{seed}" / "result.json").rename(root / f"seed{seed}" / "finished.json")
    return root


def resume_args(model, text, root, seed, out_seed):
    return search_args(model, text, root / f"seed{out_seed}", 1) + ["--seed", str(seed)]


DISAGREEMENTS = {  # each rank's (seed, seed of the checkpoint its --out holds), and what every rank must say
    "seed": ([(0, 0), (1, 0)], "ranks disagree on settings.search.seed: rank 0 has 0, rank 1 has 1"),
    "out": ([(0, 0), (0, 1)], "ranks disagree on the output directory"),
    "checkpoint": ([(1, 0), (1, 0)], "holds a search with different settings"),
}


@pytest.mark.parametrize("case", DISAGREEMENTS)
def test_ranks_that_disagree_on_a_resume_stop_with_one_line_each(case, tiny_checkpoint, two_checkpoints):
    """Rank 1 with another seed or --out, or rank 0's checkpoint made with other settings: exit 2 everywhere.

    The collective timeout is longer than the test's: only an immediate, agreed stop passes.
    """
    model, text = tiny_checkpoint
    seeds, expected = DISAGREEMENTS[case]
    ranks = finish(launch([cli(resume_args(model, text, two_checkpoints, *s)) for s in seeds], timeout="900"))
    for rc, _, err in ranks:
        assert rc == 2, err
        assert [line for line in err.splitlines() if line.strip()] == [err.strip()], err
        assert err.startswith("evopress: error: ") and expected in err, err


def test_two_processes_resume_rank_0s_checkpoint(tiny_checkpoint, two_checkpoints, tmp_path):
    """Rank 0 reads the checkpoint and hands it over; the resumed result is the single-process one."""
    model, text = tiny_checkpoint
    shutil.copytree(two_checkpoints / "seed0", tmp_path / "seed0")
    shutil.copytree(two_checkpoints / "seed0", tmp_path / "one")
    (tmp_path / "one" / "finished.json").rename(tmp_path / "one" / "result.json")
    args = resume_args(model, text, tmp_path, 0, 0)
    args.remove("--quiet")
    ranks = finish(launch([cli(args)] * 2))
    for rc, _, err in ranks:
        assert rc == 0, err
    assert "resuming from generation 1" in ranks[0][2] and ranks[1][2] == ""
    assert_same_run(tmp_path / "seed0", tmp_path / "one")
