"""Two gloo processes give exactly the single-process result; a dead rank ends the run, no hang."""

import json
import os
import socket
import subprocess
import sys
import time

from .test_reliability import comparable, search_args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, world=2, timeout="60"):
    port = free_port()
    procs = []
    for r in range(world):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "RANK": str(r), "LOCAL_RANK": str(r),
               "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "EVOPRESS_DIST_TIMEOUT": timeout}
        procs.append(subprocess.Popen([sys.executable, "-m", "evopress", *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def test_two_processes_equal_one(tiny_checkpoint, tmp_path):
    from evopress.cli import main

    model, text = tiny_checkpoint
    assert main(search_args(model, text, tmp_path / "one", 4)) == 0
    procs = launch(search_args(model, text, tmp_path / "two", 4))
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
    one, two = comparable(tmp_path / "one"), comparable(tmp_path / "two")
    assert two["recipe"].pop("device") == "cpu"  # torchrun ranks pin their device
    one["recipe"].pop("device")
    assert two == one


def test_a_dead_rank_ends_the_run_with_an_error(tiny_checkpoint, tmp_path):
    model, text = tiny_checkpoint
    out = tmp_path / "dead"
    procs = launch(search_args(model, text, out, 400), timeout="30")
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
