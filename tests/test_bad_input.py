"""Every bad input the README promises to handle: one line ``evopress: error: ...``, exit 2, no
traceback, and an existing result directory given as --out left byte-identical."""

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from evopress.cli import main
from evopress.io import LOCK


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK}


def hashes(root: Path) -> dict[str, str]:
    """Every file under ``root``, hidden ones and the lock included, by content hash."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_error_line(capsys, message: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("evopress: error:") and message in err[0], err
    return err[0]


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
    "target inf": (lambda t, m, x: ["search", "--space", "joint", "--db", "db", "--target", "inf"], "finite number"),
    "model is a file": (lambda t, m, x: [*SEARCH, "--model", str(_file(t, "notes.txt", b"notes"))],
                        "is not a model directory or a .gguf file"),
    "no --db": (lambda t, m, x: ["search", "--space", "quant", "--target", "3"], "needs --db"),
    "--db not a database": (lambda t, m, x: ["search", "--space", "quant", "--target", "3", "--db", str(t)],
                            ": no database there"),
    "unknown part of a data mix": (lambda t, m, x: [*SEARCH, "--data", "wiki+bogus"], "data 'bogus' not found"),
    "negative max-memory": (lambda t, m, x: [*SEARCH, "--max-memory", "cpu=-5GiB"], "--max-memory cpu=-5GiB"),
    "export into its own result": (lambda t, m, x: ["export", "{out}", "--out", "{out}"], "no evopress_export.json"),
}


# checked after --out is claimed, or on settings that differ from the finished result's (which is refused first)
FRESH_OUT = {"no cuda", "truncated gguf", "import-config not utf-8", "warm start over the pool", "model is a file",
             "no --db", "--db not a database", "unknown part of a data mix"}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_keeps_the_result(case, finished, tiny_checkpoint, tmp_path, capsys):
    model, text = tiny_checkpoint
    build, message = CASES[case]
    argv = [a.replace("{out}", str(finished)) for a in build(tmp_path, model, text)]
    if argv[0] in ("search", "baseline", "import-config"):
        argv += ["--out", str(tmp_path / "new" if case in FRESH_OUT else finished)]
        for flag, value in (("--model", model), ("--data", text)):
            if flag not in argv:
                argv += [flag, str(value)]
        argv += ["--quiet"]
    elif argv[0] == "run":
        argv += ["--out", str(finished), "--quiet"]
    before = snapshot(finished)
    capsys.readouterr()
    assert main(argv) == 2
    assert "Traceback" not in one_error_line(capsys, message)
    assert snapshot(finished) == before
    assert not (tmp_path / "new").exists()  # a refusal after the claim leaves no new --out behind


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


def test_a_refusal_after_the_claim_keeps_an_existing_out_as_it_was(tiny_checkpoint, tmp_path, capsys):
    model, text = tiny_checkpoint
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    assert main([*SEARCH, "--model", str(model), "--data", str(text), "--device", "cuda", "--out", str(out),
                 "--quiet"]) == 2
    one_error_line(capsys, "no usable CUDA")
    assert hashes(out) == {"notes.md": hashlib.sha256(b"mine").hexdigest()}  # no lock file left either


# Each would otherwise be found only once the model has loaded (15-115 s on a real one).
BEFORE_LOADING = {
    "no --db": (["search", "--space", "quant", "--target", "3"], "needs --db"),
    "--db not a database": (["search", "--space", "quant", "--target", "3", "--db", "{tmp}"], ": no database there"),
    "--with-sparsity not a database": (["search", "--space", "joint", "--target", "3", "--db", "{db}",
                                        "--with-sparsity", "{tmp}"], "--with-sparsity {tmp}: no database"),
    "unknown part of a data mix": ([*SEARCH, "--data", "wiki+bogus"], "data 'bogus' not found"),
    "data names no text": ([*SEARCH, "--data", "+"], "names no text"),
    "negative max-memory": ([*SEARCH, "--max-memory", "cpu=-5GiB"], "--max-memory cpu=-5GiB"),
    "max-memory not a size": ([*SEARCH, "--max-memory", "0=lots"], "--max-memory 0=lots"),
    "import-config without a target, no --db": (["import-config", "{cfg}", "--space", "quant"], "needs --db"),
    "build-db on an unknown text": (["build-db", "--space", "quant", "--bits", "2,3", "--data", "wiki+bogus"],
                                    "data 'bogus' not found"),
    "eval on an unknown text": (["eval", "{out}", "--eval-data", "wiki,bogus"], "data 'bogus' not found"),
}


@pytest.mark.parametrize("case", list(BEFORE_LOADING))
def test_refused_before_the_model_loads(case, finished, quant_db, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the mistake was found")

    monkeypatch.setattr("evopress.models.load_model", load)
    model, text = tiny_checkpoint
    argv, message = BEFORE_LOADING[case]
    fill = {"{tmp}": str(tmp_path), "{db}": str(quant_db), "{out}": str(finished),
            "{cfg}": str(_file(tmp_path, "c.txt", b"model.layers.0.self_attn: 0\n"))}
    argv = [fill.get(a, a) for a in argv]
    if argv[0] != "eval":
        argv += ["--out", str(tmp_path / "new"), "--model", str(model)]
        if "--data" not in argv:
            argv += ["--data", str(text)]
    assert main([*argv, "--quiet"]) == 2
    one_error_line(capsys, message.replace("{tmp}", str(tmp_path.resolve())))
    assert not (tmp_path / "new").exists()


@pytest.fixture(scope="module")
def quant_db(tiny_checkpoint, tmp_path_factory):
    """A finished level database of the tiny checkpoint."""
    model, text = tiny_checkpoint
    out = tmp_path_factory.mktemp("qdb") / "db"
    assert main(["build-db", "--space", "quant", "--bits", "2,3,4", "--model", str(model), "--data", str(text),
                 "--seq-len", "32", "--calib-tokens", "128", "--out", str(out), "--quiet"]) == 0
    return out


def _result_on(model: Path, finished: Path, tmp: Path) -> Path:
    """A copy of the finished result that names ``model`` as the model it was searched on."""
    result = shutil.copytree(finished, tmp / "result")
    data = json.loads((result / "result.json").read_text())
    data["recipe"]["model"] = str(model)
    (result / "result.json").write_text(json.dumps(data))
    return result


@pytest.mark.parametrize("into", ["its model", "its result", "a level database"])
def test_export_never_writes_into_what_it_reads_or_another_runs_directory(into, finished, quant_db, tiny_checkpoint,
                                                                          tmp_path, capsys):
    model = shutil.copytree(tiny_checkpoint[0], tmp_path / "model")
    result = _result_on(model, finished, tmp_path)
    out = {"its model": model, "its result": result,
           "a level database": shutil.copytree(quant_db, tmp_path / "db")}[into]
    before = hashes(out)
    assert main(["export", str(result), "--out", str(out), "--quiet"]) == 2
    one_error_line(capsys, "is the model this result was searched on" if into == "its model" else
                   "no evopress_export.json")
    assert hashes(out) == before  # nothing overwritten, nothing added (not even a lock file)


def test_export_claims_its_out_and_replaces_only_its_own_files(finished, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(finished), "--out", str(out), "--quiet"]) == 0
    written = json.loads((out / "evopress_export.json").read_text())
    assert "model.safetensors" in written["files"] and written["result"] == str(finished.resolve())
    assert set(hashes(out)) == {*written["files"], "evopress_export.json"}  # no lock or staging left behind
    (out / "README.md").write_text("the user's")
    (out / "old_profile.json").write_text("{}")  # a file an earlier export wrote that this one does not
    (out / "evopress_export.json").write_text(json.dumps({**written, "files": [*written["files"], "old_profile.json"]}))
    assert main(["export", str(finished), "--out", str(out), "--quiet"]) == 0
    assert (out / "README.md").read_text() == "the user's" and not (out / "old_profile.json").exists()
    assert json.loads((out / "evopress_export.json").read_text())["files"] == written["files"]
    capsys.readouterr()
    (out / "evopress_export.json").unlink()  # now a directory with files no export claims
    before = hashes(out)
    assert main(["export", str(finished), "--out", str(out), "--quiet"]) == 2
    one_error_line(capsys, "no evopress_export.json")
    assert hashes(out) == before
    assert main(["export", str(finished), "--out", str(tmp_path / "new"), "--device", "cuda", "--quiet"]) == 2
    one_error_line(capsys, "no usable CUDA")
    assert not (tmp_path / "new").exists()


# Run without --quiet: each printed an info line before its error line.
SCHEDULE = SEARCH[1:3] + SEARCH[5:]  # SEARCH's options but --target
ALONE = {
    "import-config, a file that does not parse": lambda t, m, x, db: [
        "import-config", str(_file(t, "c.txt", b"garbage\n")), "--target", "0.34", "--model", str(m), "--data",
        str(x), "--out", str(t / "o")],
    "import-config without a target, a file that does not parse": lambda t, m, x, db: [
        "import-config", str(_file(t, "c.txt", b"garbage\n")), "--model", str(m), "--out", str(t / "o")],
    "eval with a missing lm-eval include": lambda t, m, x, db: [
        "eval", str(t / "result"), "--eval-data", str(x), "--eval-tokens", "64", "--eval-seq-len", "32",
        "--lm-eval", "arc_easy", "--lm-eval-include", str(t / "nope")],
    "build-db with bad --bits": lambda t, m, x, db: [
        "build-db", "--space", "quant", "--bits", "2,9", "--model", str(m), "--data", str(x), "--seq-len", "32",
        "--calib-tokens", "128", "--out", str(t / "db")],
    "build-db into a finished database": lambda t, m, x, db: [
        "build-db", "--space", "quant", "--bits", "2,3", "--model", str(m), "--data", str(x), "--seq-len", "32",
        "--calib-tokens", "128", "--out", str(db)],
    "a truncated gguf": lambda t, m, x, db: [*SEARCH, *_gguf_truncated(t, m, x), "--data", str(x), "--out",
                                            str(t / "o")],
    "joint: a byte target below any kept sub-block": lambda t, m, x, db: [
        "search", "--space", "joint", "--db", str(db), "--target", "1", "--target-bytes", *SCHEDULE, "--model",
        str(m), "--data", str(x), "--out", str(t / "o")],
    "pareto: the baselines' --tokens over the pool": lambda t, m, x, db: [
        "pareto", "--targets", "0.2,0.4", *SCHEDULE, "--model", str(m), "--data", str(x), "--out", str(t / "p")],
}


@pytest.mark.parametrize("case", list(ALONE))
def test_an_error_is_the_only_line_printed(case, finished, quant_db, tiny_checkpoint, tmp_path, capsys):
    model, text = tiny_checkpoint
    shutil.copytree(finished, tmp_path / "result")
    argv = ALONE[case](tmp_path, model, text, quant_db)
    capsys.readouterr()
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("evopress: error:"), err
