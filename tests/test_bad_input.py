"""Every bad input the README promises to handle: one line ``evopress: error: ...``, exit 2, no
traceback, and an existing result directory given as --out left byte-identical."""

import fcntl
import os
from pathlib import Path

import pytest

from evopress.cli import main
from evopress.io import LOCK


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK}


@pytest.fixture(scope="module")
def finished(tiny_checkpoint, tmp_path_factory):
    """A finished search result, the directory every bad command is pointed at."""
    model, text = tiny_checkpoint
    out = tmp_path_factory.mktemp("finished")
    assert main(["search", "--target", "0.34", "--model", str(model), "--data", str(text), "--seq-len", "32",
                 "--calib-tokens", "256", "--final-tokens", "64", "--generations", "1", "--offspring", "2",
                 "--stages", "1:32", "--initial-candidates", "2", "--initial-tokens", "32", "--init-from", "none",
                 "--out", str(out), "--quiet"]) == 0
    return out


def _gguf_truncated(tmp: Path, model: Path, text: Path) -> list[str]:
    import gguf

    path = tmp / "cut.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", __import__("numpy").zeros((8, 4), dtype="float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    path.write_bytes(path.read_bytes()[:60])
    return ["--model", str(path)]


def _file(tmp: Path, name: str, data: bytes) -> Path:
    (tmp / name).write_bytes(data)
    return tmp / name


# (name, extra argv builder or full argv, expected fragment). "{out}" is the finished result directory.
SEARCH = ["search", "--init-from", "none", "--target", "0.34", "--generations", "1", "--stages", "1:32",
          "--seq-len", "32", "--final-tokens", "64", "--initial-tokens", "32", "--calib-tokens", "256"]
CASES = {
    "no cuda": (lambda t, m, x: [*SEARCH, "--device", "cuda"], "no usable CUDA"),
    "truncated gguf": (lambda t, m, x: [*SEARCH, *_gguf_truncated(t, m, x)], "cannot load GGUF"),
    "unknown space": (lambda t, m, x: [*SEARCH, "--space", "nope"], "unknown space 'nope'"),
    "unknown method": (lambda t, m, x: ["baseline", "--target", "0.34", "--method", "magic"], "unknown method"),
    "unknown init-from": (lambda t, m, x: [*SEARCH, "--init-from", "oracle"], "unknown method 'oracle'"),
    "warm start over the pool": (lambda t, m, x: [*SEARCH, "--init-from", "auto"],
                                 "the --init-from baselines' sample (--tokens) (4096 tokens) is larger"),
    "target out of range": (lambda t, m, x: [*SEARCH[:1], "--target", "1.5"], "out of range"),
    "quant target above 8 bits": (lambda t, m, x: ["search", "--space", "quant", "--target", "9", "--db", "db"],
                                  "average bits per weight in (0, 8]"),
    "bad stages": (lambda t, m, x: [*SEARCH, "--stages", "2-32"], "--stages"),
    "final tokens 0": (lambda t, m, x: [*SEARCH, "--final-tokens", "0"], "final-tokens"),
    "batch size 0": (lambda t, m, x: [*SEARCH, "--batch-size", "0"], "batch-size"),
    "baseline tokens 0": (lambda t, m, x: ["baseline", "--target", "0.34", "--method", "shortgpt", "--tokens", "0"],
                          "tokens"),
    "random candidates 0": (lambda t, m, x: ["baseline", "--target", "0.34", "--method", "random",
                                             "--candidates", "0"], "candidates"),
    "option of another space": (lambda t, m, x: [*SEARCH, "--count-overhead"], "not an option of space 'drop'"),
    "baseline over a search": (lambda t, m, x: ["baseline", "--target", "0.34", "--method", "shortgpt"],
                               "different settings"),
    "search with other settings": (lambda t, m, x: [*SEARCH[:-4], "--seq-len", "16"], "different settings"),
    "import-config not utf-8": (lambda t, m, x: ["import-config", str(_file(t, "c.txt", b"\xff\xfe\x00bad")),
                                                 "--target", "0.34"], "not UTF-8"),
    "recipe wrong type": (lambda t, m, x: ["run", str(_file(t, "r.yaml", b"target: 0.3\nsearch: {stages: 5}\n"))],
                          "search.stages"),
    "recipe string for a number": (lambda t, m, x: ["run", str(_file(t, "r2.yaml", b"target: lots\n"))],
                                   "target = 'lots'"),
    "recipe unknown space option": (lambda t, m, x: ["run", str(_file(t, "r3.yaml",
                                                                     b"target: 0.3\nspace_options: {bits: 3}\n"))],
                                    "has no option 'bits'"),
    "eval tokens 0": (lambda t, m, x: ["eval", "{out}", "--eval-tokens", "0"], "--eval-tokens 0"),
}


# checked after --out is claimed
FRESH_OUT = {"no cuda", "truncated gguf", "import-config not utf-8", "warm start over the pool"}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_keeps_the_result(case, finished, tiny_checkpoint, tmp_path, capsys):
    model, text = tiny_checkpoint
    build, message = CASES[case]
    argv = [a.replace("{out}", str(finished)) for a in build(tmp_path, model, text)]
    if argv[0] in ("search", "baseline", "import-config"):
        argv += ["--out", str(tmp_path / "new" if case in FRESH_OUT else finished)]
        if "--model" not in argv:
            argv += ["--model", str(model)]
        argv += ["--data", str(text), "--quiet"]
    elif argv[0] == "run":
        argv += ["--out", str(finished), "--quiet"]
    before = snapshot(finished)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("evopress: error:") and message in err[0], err
    assert "Traceback" not in err[0]
    assert snapshot(finished) == before


def test_a_checkpoint_of_the_wrong_shape_is_one_line_and_kept(tiny_checkpoint, tmp_path, capsys):
    model, text = tiny_checkpoint
    out = tmp_path / "odd"
    out.mkdir()
    (out / "checkpoint.json").write_text("null")
    assert main([*SEARCH, "--model", str(model), "--data", str(text), "--out", str(out), "--quiet"]) == 2
    assert "is not an evopress checkpoint" in capsys.readouterr().err
    assert (out / "checkpoint.json").read_text() == "null"


def test_out_that_is_a_file_is_refused_before_loading(tiny_checkpoint, tmp_path, capsys):
    blocker = _file(tmp_path, "file", b"x")
    assert main([*SEARCH, "--model", "/does/not/exist", "--out", str(blocker)]) == 2
    assert "is a file" in capsys.readouterr().err  # the model path is checked later: --out first


def test_errors_need_no_model(tmp_path, capsys):
    """Argument mistakes are reported before the model is loaded (a missing model would be reported instead)."""
    for argv in ([*SEARCH[:1], "--target", "1.5"], [*SEARCH, "--stages", "2-32"], [*SEARCH, "--space", "nope"],
                 [*SEARCH, "--final-tokens", "0"], [*SEARCH, "--init-from", "oracle"]):
        assert main([*argv, "--model", "/does/not/exist", "--out", str(tmp_path / "o")]) == 2
        assert "not found" not in capsys.readouterr().err


def test_a_locked_out_is_refused(tiny_checkpoint, tmp_path, capsys):
    model, text = tiny_checkpoint
    out = tmp_path / "busy"
    out.mkdir()
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert main([*SEARCH, "--model", str(model), "--data", str(text), "--out", str(out), "--quiet"]) == 2
        assert "in use by another evopress run" in capsys.readouterr().err
        assert not (out / "result.json").exists() and not (out / "recipe.json").exists()
    finally:
        os.close(fd)
    assert main([*SEARCH, "--model", str(model), "--data", str(text), "--out", str(out), "--quiet"]) == 0
