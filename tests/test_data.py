"""Calibration and evaluation text: the joined-text protocol, tokenizing in pieces, windows drawn across
the whole text, the pool size rule, mixtures, and bad input files."""

import json
import random

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from evopress import data, tokens
from evopress.data import (PROTOCOL, SEPARATOR, TokenPool, calibration_windows, evaluation_windows, load_pool,
                           sample_documents)
from evopress.tokens import token_ids
from evopress.errors import UserError
from evopress.recipe import make_recipe

from .conftest import WORDS


def _docs(n: int = 60, seed: int = 0) -> list[str]:
    """Documents with punctuation, trailing spaces, line breaks and non-ASCII, which tokenizers treat specially."""
    rng = random.Random(seed)
    extra = ["café", "naïve", "日本", "--", "(1990)", "e.g.", "  "]
    return [" ".join(rng.choice(WORDS + extra) for _ in range(rng.randint(5, 80))) + rng.choice(["", ".", " ", "\n"])
            for _ in range(n)]


def _trained(kind: str) -> PreTrainedTokenizerFast:
    """A small real tokenizer: byte-level BPE (GPT-2/Llama-3 style) or SentencePiece-style Metaspace BPE."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if kind == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # Llama-2 style: a leading "▁" is added to the start of every string tokenized
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = sorted(set("".join(_docs()) + "\n▁"))
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=alphabet, special_tokens=["<unk>"])
    tok.train_from_iterator([d + SEPARATOR for d in _docs(200, seed=1)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def _one_shot(tok, text: str) -> np.ndarray:
    return np.asarray(tok(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_tokenizing_in_pieces_equals_tokenizing_the_joined_text_at_once(kind, monkeypatch):
    monkeypatch.setattr(tokens, "CONTEXT_CHARS", 64)  # little context: the cuts are tested hard
    tok = _trained(kind)
    text = SEPARATOR.join(_docs())
    encoded: list[int] = []

    class Spy:  # records how long the texts handed to the tokenizer are
        class backend_tokenizer:
            @staticmethod
            def encode_batch(texts, **kw):
                encoded.extend(map(len, texts))
                return tok.backend_tokenizer.encode_batch(texts, **kw)

    for piece_chars in (37, 500, 4000):
        encoded.clear()
        assert np.array_equal(token_ids(Spy(), text, piece_chars=piece_chars), _one_shot(tok, text))
        assert max(encoded) <= piece_chars + 2 * 64  # really in pieces: no two had to be tokenized as one
    # cutting without context changes tokens, so the test above can fail
    naive = np.concatenate([_one_shot(tok, text[s: s + 500]) for s in range(0, len(text), 500)])
    assert not np.array_equal(naive, _one_shot(tok, text))


def test_pieces_that_disagree_at_a_cut_are_tokenized_as_one(monkeypatch):
    """BPE without pre-tokenizer on 'aaaa...': the pairing depends on where the text starts, at any distance."""
    from tokenizers import Tokenizer, models

    monkeypatch.setattr(tokens, "CONTEXT_CHARS", 16)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE({"a": 0, "aa": 1}, [("a", "a")])))
    text = "a" * 3001
    assert np.array_equal(token_ids(tok, text, piece_chars=101), _one_shot(tok, text))


def _remote(tok, spec: str | None = None, here: bool = False):
    """``tok``'s backend, serialized as ``spec`` (default: its own JSON); it tokenizes in this process only
    if ``here``."""
    class Remote:
        class backend_tokenizer:
            to_str = staticmethod(lambda: spec if spec is not None else tok.backend_tokenizer.to_str())

            @staticmethod
            def encode_batch(*args, **kwargs):
                assert here, "tokenized in this process"
                return tok.backend_tokenizer.encode_batch(*args, **kwargs)
    return Remote()


def test_a_long_text_is_tokenized_in_a_child_process_with_the_same_ids(monkeypatch):
    """The tokenizer's threads would keep their memory in this process to its end (``tokens`` module doc)."""
    monkeypatch.setattr(tokens, "APART_CHARS", 1000)
    tok = _trained("metaspace")
    text = SEPARATOR.join(_docs())  # with non-ASCII characters: offsets are counted in characters
    assert len(text) > 1000
    assert np.array_equal(token_ids(_remote(tok), text, piece_chars=500), _one_shot(tok, text))
    first = token_ids(_remote(tok), text, max_tokens=10, piece_chars=100)  # stops after one batch
    assert np.array_equal(first, tokens._in_pieces(tok.backend_tokenizer, text, 10, 100))
    assert 10 <= len(first) < len(_one_shot(tok, text))


def test_a_failing_tokenizer_child_warns_and_tokenizes_here(monkeypatch):
    monkeypatch.setattr(tokens, "APART_CHARS", 10)
    tok, text = _trained("bytelevel"), SEPARATOR.join(_docs(3))
    with pytest.warns(UserWarning, match="child process failed.*key must be a string.*in this process"):
        ids = token_ids(_remote(tok, spec="{not json", here=True), text)
    assert np.array_equal(ids, _one_shot(tok, text))


def test_importing_the_package_does_not_import_torch():
    """The tokenizing child imports the package; the API still loads on first use."""
    import subprocess
    import sys

    code = ("import sys, evopress; assert 'torch' not in sys.modules and 'search' in dir(evopress); "
            "from evopress import search, load_compressed; assert 'torch' in sys.modules and callable(search)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_tokenizer_without_offsets_tokenizes_the_text_in_one_call(tiny_checkpoint):
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint[0])
    calls = []

    def plain(text, add_special_tokens):
        calls.append(text)
        return tok(text, add_special_tokens=add_special_tokens)

    text = SEPARATOR.join(_docs())
    assert np.array_equal(token_ids(plain, text, piece_chars=100), _one_shot(tok, text)) and calls == [text]


def test_windows_follow_the_joined_text_protocol():
    """Documents joined with blank lines and tokenized as one text (not one by one), then cut into windows."""
    tok = _trained("bytelevel")
    docs = _docs()
    joined = _one_shot(tok, SEPARATOR.join(docs))
    n = len(joined) // 16
    assert torch.equal(evaluation_windows(tok, docs, 16, None).flatten(), torch.from_numpy(joined[: n * 16]))
    assert torch.equal(evaluation_windows(tok, docs, 16, 100), evaluation_windows(tok, docs, 16, None)[:7])
    per_document = np.concatenate([_one_shot(tok, d + SEPARATOR) for d in docs])  # the old, different stream
    assert not np.array_equal(per_document[: len(joined)], joined)
    assert PROTOCOL.startswith("GPTQ protocol: documents joined with blank lines, tokenized as one text")


def test_calibration_windows_are_drawn_across_the_whole_text_and_nest(tiny_checkpoint, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint[0])
    first, last = WORDS[:10], WORDS[-10:]  # the first half of the file uses other words than the second
    rng = random.Random(0)
    docs = [" ".join(rng.choice(first if i < 50 else last) for _ in range(40)) for i in range(100)]
    (tmp_path / "t.txt").write_text(SEPARATOR.join(docs))
    pool = load_pool(tok, str(tmp_path / "t.txt"), "calibration", 8, 64)
    grid = evaluation_windows(tok, docs, 8, None)
    assert pool.tokens == 64 and len(grid) == 500
    rows = [next(i for i in range(len(grid)) if torch.equal(grid[i], w)) for w in pool.windows]
    assert min(rows) < 250 <= max(rows)  # both halves of the text, not its first windows
    vocab = tok.convert_ids_to_tokens(pool.windows.flatten().tolist())
    assert set(vocab) & set(first) and set(vocab) & set(last)
    larger = load_pool(tok, str(tmp_path / "t.txt"), "calibration", 8, 256).windows
    assert torch.equal(larger[: len(pool.windows)], pool.windows)  # a pool is a prefix of any larger one
    assert torch.equal(calibration_windows(tok, docs, 8, None)[:8], pool.windows)  # and the order is seeded


def test_a_long_text_is_reduced_to_a_seeded_sample_of_documents():
    docs = [f"doc{i} " + "x" * 98 for i in range(1000)]  # about 105 characters each
    assert sample_documents(docs, 10**6) is docs
    sample = sample_documents(docs, 10_000)
    assert sample == sample_documents(docs, 10_000)
    assert 10_000 <= sum(len(d) + len(SEPARATOR) for d in sample) < 10_000 + 110  # the budget, passed by one at most
    index = [int(d.split()[0][3:]) for d in sample]
    assert index == sorted(index) and index[0] < 100 and index[-1] > 900  # text order, spread over the text
    assert sample_documents(["y" * 50_000], 10_000) == ["y" * 10_000]


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


def test_a_sample_never_silently_shrinks_to_the_pool():
    pool = TokenPool(torch.zeros(4, 8, dtype=torch.long), "zeros")
    assert pool.sample(32, np.random.default_rng(0)).tokens == 32
    with pytest.raises(UserError, match="sample of 33 tokens does not fit the calibration pool of 32"):
        pool.sample(33, np.random.default_rng(0))
    with pytest.raises(UserError, match="33"):
        pool.first(33)


def test_the_default_pool_is_sized_from_the_schedule():
    assert make_recipe().pool_tokens() == 32768
    assert make_recipe(stages=[(2, 2048), (1, 32768)]).pool_tokens() == 4 * 32768
    assert make_recipe(stages=[(2, 2048), (1, 32768)], calib_tokens=40000).pool_tokens() == 40000
    assert make_recipe(method="shortgpt", baseline_tokens=50000).pool_tokens() == 50000
    assert make_recipe(init_from=["shortgpt"], baseline_tokens=50000).pool_tokens() == 50000
    assert make_recipe(final_tokens=40000).pool_tokens() == 40000
    with pytest.raises(UserError, match="calib_tokens .--calib-tokens. must be a positive"):
        make_recipe(calib_tokens=0)


def test_fingerprints_of_recipes_that_set_the_pool_are_unchanged():
    """Values computed before calib_tokens could be unset: checkpoints written then still resume.

    (``data="wiki"``: the default calibration was Wikipedia alone then; the fitness was the token mean
    and any better child replaced its parent.)"""
    old = dict(data="wiki", init_from=[], aggregate="tokens", accept_sigmas=0)
    assert make_recipe(calib_tokens=32768, **old).fingerprint() == "4dabdcaf318bbd66"
    assert make_recipe(calib_tokens=1024, seq_len=32, stages=[(1, 64)], **old).fingerprint() == "c0a049eafa7b0a0d"
    assert make_recipe(calib_tokens=1024, seq_len=32, stages=[(1, 64)], **{**old, "accept_sigmas": 1}
                       ).fingerprint() != "c0a049eafa7b0a0d"


def _documented_default_calibration() -> str:
    """The default calibration as README.md states it to users."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    stated = re.search(r"\*\*The default calibration is `([^`]+)`\*\*", readme)
    assert stated, "README.md no longer states the default calibration as **The default calibration is `...`**"
    return stated.group(1)


def test_the_default_calibration_is_the_documented_equal_token_mix(tiny_checkpoint, monkeypatch):
    """A search without --data calibrates on the mix the README names, in equal tokens of each source.

    Why: the default decides what every profile is optimised for (docs/depth.md). The built-in texts
    are replaced by distinct word sets per source, so each pool window tells which source it came from;
    the pool is the one ``prepare`` (what every run goes through) draws from a bare command line.
    """
    from evopress.cli import build_parser, recipe_from_args
    from evopress.pipeline import prepare

    documented = _documented_default_calibration()
    sources = documented.split("+")
    assert sources == ["wiki", "ptb", "docs", "tweets"]  # encyclopedic, news, technical docs, social media
    n = len(WORDS) // len(sources)
    vocab = {s: WORDS[i * n: (i + 1) * n] for i, s in enumerate(sources)}
    rng = random.Random(0)
    fake = {s: [" ".join(rng.choice(vocab[s]) for _ in range(40)) for _ in range(60)] for s in sources}
    monkeypatch.setattr(data, "documents", lambda source, role: fake[source])
    data._calibration_ids.cache_clear()  # token ids of the real texts must not be reused, nor these kept
    model, _ = tiny_checkpoint
    args = build_parser().parse_args(["search", "--target", "0.34", "--model", str(model), "--seq-len", "16",
                                      "--calib-tokens", "320", "--stages", "1:64", "--initial-tokens", "64",
                                      "--final-tokens", "64", "--init-from", "none", "--out", "unused"])
    db_args = build_parser().parse_args(["build-db", "--space", "sparsity", "--out", "unused"])
    try:
        pool = prepare(recipe_from_args(args, "evopress"), log=lambda m: None).pool
    finally:
        data._calibration_ids.cache_clear()
    assert args.data == db_args.data == make_recipe().data == documented
    assert pool.source == documented and pool.tokens == 320
    tok = AutoTokenizer.from_pretrained(model)
    words = [set(tok.convert_ids_to_tokens(w.tolist())) for w in pool.windows]
    for k, s in enumerate(sources):  # windows alternate between the sources, 5 windows of 16 tokens each
        assert all(w <= set(vocab[s]) for w in words[k::len(sources)]), s
        assert len(words[k::len(sources)]) == 5
    assert pool.names == tuple(sources) and pool.labels.tolist() == list(range(len(sources))) * 5


def test_check_samples_refuses_or_warns_with_the_numbers():
    logged = []
    data.check_samples({"the largest --stages sample": 2048, "--final-tokens": 4096}, 2048, 16384, "the pool",
                       logged.append)
    assert logged == []
    data.check_samples({"the largest --stages sample": 8192}, 8192, 16384, "the pool", logged.append)
    assert len(logged) == 1 and "WARNING" in logged[0] and "50% of the pool (16384 tokens)" in logged[0]
    assert "share about 50% of their windows" in logged[0] and "--calib-tokens 32768" in logged[0]
    with pytest.raises(UserError, match=r"^--final-tokens \(40000 tokens\) is larger than the pool \(16384 tokens\); "
                                        r"give --calib-tokens 40000 or more"):
        data.check_samples({"the largest --stages sample": 2048, "--final-tokens": 40000}, 2048, 16384, "the pool",
                           logged.append)


def _search(model, text, out, *extra):
    return ["search", "--target", "0.34", "--model", str(model), "--data", str(text), "--seq-len", "32",
            "--generations", "1", "--offspring", "2", "--stages", "1:64", "--initial-candidates", "2",
            "--initial-tokens", "64", "--final-tokens", "128", "--init-from", "none", "--out", str(out), *extra]


def test_cli_refuses_a_pool_smaller_than_a_sample_before_loading_the_model(tmp_path, capsys):
    from evopress.cli import main

    argv = _search(tmp_path / "no-model", "wiki", tmp_path / "out", "--stages", "2:2048,1:32768", "--calib-tokens",
                   "16384")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "the largest --stages sample (32768 tokens) is larger than the calibration pool (16384 tokens)" in err[0]
    assert "--calib-tokens 131072 or more" in err[0]


def test_cli_warns_when_stage_samples_would_mostly_overlap(tiny_checkpoint, tmp_path, capsys):
    from evopress.cli import main

    model, text = tiny_checkpoint
    assert main(_search(model, text, tmp_path / "out", "--calib-tokens", "192", "--stages", "1:96")) == 0
    assert "WARNING: the largest --stages sample (96 tokens) is 50% of the calibration pool" in capsys.readouterr().err


def test_the_pool_defaults_to_the_whole_of_a_short_text_and_an_explicit_one_must_fit(tiny_checkpoint, tmp_path,
                                                                                     capsys):
    from evopress.cli import main

    model, text = tiny_checkpoint
    assert main(_search(model, text, tmp_path / "default", "--quiet")) == 0
    grid = evaluation_windows(AutoTokenizer.from_pretrained(model), data.documents(str(text), "calibration"), 32, None)
    result = json.loads((tmp_path / "default" / "result.json").read_text())
    assert result["calibration_tokens"] == grid.numel() < 32768  # the whole text
    assert result["recipe"]["calib_tokens"] is None  # the default pool: a rerun of recipe.json draws it again
    assert main(_search(model, text, tmp_path / "default", "--quiet")) == 0  # the same command: same settings
    assert main(_search(model, text, tmp_path / "big", "--calib-tokens", "100000")) == 2
    assert f"--calib-tokens 100000 is more than all of data '{text}' in windows of 32 ({grid.numel()} tokens)" \
        in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text(" ".join(["the city of the river"] * 20))  # 100 tokens: 3 windows of 32
    assert main(_search(model, short, tmp_path / "short", "--final-tokens", "128")) == 2
    assert "--final-tokens (128 tokens) is larger than all of data" in capsys.readouterr().err


def test_cli_refuses_a_jsonl_that_is_not_utf8_in_one_line(tiny_checkpoint, tmp_path, capsys):
    from evopress.cli import main

    model, _ = tiny_checkpoint
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "the city"}\n{"text": "\xff"}\n')
    assert main(_search(model, bad, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"evopress: error: {bad}:2: not UTF-8 (byte 0xff); a .jsonl file must be UTF-8 encoded"]


def test_bos_is_prepended_when_the_tokenizer_adds_it_and_never_scored(tmp_path):
    from evopress.data import bos_token, load_pool

    from .conftest import word_tokenizer

    text = tmp_path / "t.txt"
    text.write_text("\n\n".join("the city of the river was known in the world " * 20 for _ in range(8)))
    plain, llama3 = word_tokenizer(), word_tokenizer(add_bos=True)
    assert bos_token(plain, "auto") is None and bos_token(llama3, "auto") == llama3.bos_token_id == 1
    assert bos_token(llama3, "never") is None and bos_token(plain, "always") == 1
    pool = load_pool(llama3, str(text), "calibration", 16, 160, bos_token(llama3, "auto"))
    assert pool.seq_len == 16 and (pool.windows[:, 0] == 1).all() and (pool.windows[:, 1:] != 1).all()
    assert pool.bos == 1
    without = load_pool(llama3, str(text), "evaluation", 16, 160, None)
    assert without.bos is None and (without.windows[:, 0] != 1).all()
    with pytest.raises(UserError, match="--bos"):
        bos_token(plain, "sometimes")
