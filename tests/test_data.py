"""Calibration and evaluation text: mixtures of sources interleave equal shares; bad input files are refused."""

import pytest
from transformers import AutoTokenizer

from evopress import data
from evopress.data import load_pool
from evopress.errors import UserError


def test_a_mixture_interleaves_equal_shares_of_each_source(tiny_checkpoint, tmp_path):
    model, _ = tiny_checkpoint
    tok = AutoTokenizer.from_pretrained(model)
    (tmp_path / "a.txt").write_text("\n\n".join(["the city of the river"] * 200))
    (tmp_path / "b.txt").write_text("\n\n".join(["music and film team"] * 200))
    a, b = str(tmp_path / "a.txt"), str(tmp_path / "b.txt")
    pool = load_pool(tok, f"{a}+{b}", "calibration", 8, 64)
    only_a = load_pool(tok, a, "calibration", 8, 32).windows
    only_b = load_pool(tok, b, "calibration", 8, 32).windows
    assert pool.tokens == 64 and pool.source == f"{a}+{b}"
    assert (pool.windows[0::2] == only_a).all() and (pool.windows[1::2] == only_b).all()
    with pytest.raises(UserError, match="not found"):
        load_pool(tok, f"{a}+missing.txt", "calibration", 8, 64)


def test_bad_text_files_are_refused_with_one_clear_line(tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    (tmp_path / "number.jsonl").write_text('{"text": "fine"}\n\n{"text": 5}\n')
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 40)
    (tmp_path / "mostly.txt").write_bytes(b"the city of the river " * 40 + b"\xff")  # one bad byte in 881
    for name, message in [("latin1.jsonl", r"latin1.jsonl:2: not UTF-8 \(byte 0xe9\)"),
                          ("number.jsonl", r"number.jsonl:3: 'text' must be a string, not int"),
                          ("binary.txt", r"binary.txt does not look like text: \d+ of its \d+ characters")]:
        with pytest.raises(UserError, match=message):
            data.documents(str(tmp_path / name), "calibration")
    assert data.documents(str(tmp_path / "mostly.txt"), "calibration")[0].endswith("river \ufffd")


def _search(model, text, out, *extra):
    return ["search", "--target", "0.34", "--model", str(model), "--data", str(text), "--seq-len", "32",
            "--generations", "1", "--offspring", "2", "--stages", "1:64", "--initial-candidates", "2",
            "--initial-tokens", "64", "--final-tokens", "128", "--out", str(out), *extra]


def test_cli_refuses_a_jsonl_that_is_not_utf8_in_one_line(tiny_checkpoint, tmp_path, capsys):
    from evopress.cli import main

    model, _ = tiny_checkpoint
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "the city"}\n{"text": "\xff"}\n')
    assert main(_search(model, bad, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"evopress: error: {bad}:2: not UTF-8 (byte 0xff); a .jsonl file must be UTF-8 encoded"]
