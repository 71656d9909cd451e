"""GGUF reading/writing for the gguf space, on tiny synthetic files built here with gguf-py."""

import numpy as np
import pytest

import gguf  # noqa: E402  (a core dependency)

pytest.importorskip("libgguf", reason="the gguf extra (libgguf) is not installed; make test installs it")

from evopress.errors import UserError  # noqa: E402
from evopress.spaces.gguf import ggufio, types  # noqa: E402

N_HEAD, N_HEAD_KV = 4, 2


def _kv(reader) -> dict:
    """Every KV field as (types, bytes of its parts), header pseudo-fields left out."""
    return {f.name: (list(f.types), [bytes(np.asarray(p).tobytes()) for p in f.parts[2:]])
            for f in reader.fields.values() if not f.name.startswith("GGUF.")}


@pytest.fixture
def source_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny")
    w.add_block_count(1)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_context_length(128)
    w.add_file_type(7)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["<s>", "</s>", "a", "b", "ĠÃ©", "\u2581x"])
    w.add_token_types([3, 3, 1, 1, 1, 1])
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_tensor("token_embd.weight", rng.normal(size=(64, 256)).astype(np.float16))
    q = types.quantize(rng.normal(size=(256, 256)).astype(np.float32), "Q8_0", None)
    w.add_tensor("blk.0.attn_q.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_norm.weight", rng.normal(size=256).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_read_header(source_file):
    src = ggufio.read_header(source_file)
    assert src.arch == "llama"
    assert (src.n_head, src.n_head_kv, src.n_layer, src.tied) == (N_HEAD, N_HEAD_KV, 1, True)
    assert list(src.tensors) == ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_norm.weight"]
    assert src.tensors["token_embd.weight"] == ggufio.TensorInfo("token_embd.weight", "F16", (64, 256))
    assert src.tensors["blk.0.attn_q.weight"].qtype == "Q8_0"
    assert src.tensors["blk.0.attn_q.weight"].shape == (256, 256)
    assert src.tensors["blk.0.attn_norm.weight"] == ggufio.TensorInfo("blk.0.attn_norm.weight", "F32", (256,))


def test_write_gguf_replaces_one_tensor(source_file, tmp_path):
    src = ggufio.read_header(source_file)
    weight = ggufio.dequantized(src, "blk.0.attn_q.weight")
    raw = types.quantize(weight, "Q4_K", np.ones(256, np.float32))
    out = tmp_path / "out" / "mixed.gguf"
    size = ggufio.write_gguf(src, out, {"blk.0.attn_q.weight": ("Q4_K", raw)})
    assert size == out.stat().st_size
    assert not [p for p in out.parent.iterdir() if p.name != out.name]  # no temp file left behind

    a, b = gguf.GGUFReader(source_file), gguf.GGUFReader(out)
    assert _kv(a) == _kv(b)
    assert b.alignment == a.alignment
    assert [t.name for t in b.tensors] == [t.name for t in a.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
        if ta.name == "blk.0.attn_q.weight":
            assert tb.tensor_type == gguf.GGMLQuantizationType.Q4_K
            assert list(tb.shape) == [256, 256]
            assert np.asarray(tb.data).tobytes() == raw.tobytes()
        else:
            assert tb.tensor_type == ta.tensor_type and list(tb.shape) == list(ta.shape)
            assert np.asarray(tb.data).tobytes() == np.asarray(ta.data).tobytes()

    new = ggufio.read_header(out)
    assert new.tensors["blk.0.attn_q.weight"].qtype == "Q4_K"
    got = ggufio.dequantized(new, "blk.0.attn_q.weight")
    want = types.dequantize(raw, "Q4_K", 256)
    assert got.shape == (256, 256)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_write_gguf_file_type_and_bad_bytes(source_file, tmp_path):
    src = ggufio.read_header(source_file)
    out = tmp_path / "ft.gguf"
    ggufio.write_gguf(src, out, {}, file_type=15)
    assert gguf.GGUFReader(out).get_field("general.file_type").contents() == 15
    with pytest.raises(ValueError):
        ggufio.write_gguf(src, out, {"blk.0.attn_q.weight": ("Q4_K", np.zeros((256, 10), np.uint8))})


def test_row_order():
    rng = np.random.default_rng(1)
    hf = rng.normal(size=(32, 16)).astype(np.float32)
    gguf_rows = hf.reshape(N_HEAD, 2, 32 // N_HEAD // 2, 16).swapaxes(1, 2).reshape(32, 16)  # convert_hf_to_gguf
    bf16 = (hf.view(np.uint32) & 0xFFFF0000).view(np.float32)  # what a bf16 load of hf keeps
    perm = ggufio.row_order(gguf_rows, bf16, [N_HEAD, N_HEAD_KV])
    assert np.array_equal(hf[perm], gguf_rows)
    assert np.array_equal(ggufio.row_order(hf, bf16, [N_HEAD, N_HEAD_KV]), np.arange(32))
    with pytest.raises(ValueError):
        ggufio.row_order(hf, rng.normal(size=(32, 16)).astype(np.float32), [N_HEAD, N_HEAD_KV])


def test_imatrix_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    entries = {"blk.0.attn_q.weight": rng.random(256).astype(np.float32) + 0.1,
               "blk.0.ffn_down.weight": rng.random(512).astype(np.float32)}
    counts = {"blk.0.attn_q.weight": 1000, "blk.0.ffn_down.weight": 1000}
    path = tmp_path / "imatrix.gguf"
    ggufio.write_imatrix(path, entries, counts, chunk_size=512, datasets=["calib.txt"])
    back = ggufio.read_imatrix(path)
    assert set(back) == set(entries)
    for name, mean in entries.items():
        np.testing.assert_allclose(back[name], mean, rtol=1e-6)
    r = gguf.GGUFReader(path)
    assert r.get_field("general.type").contents() == "imatrix"
    assert r.get_field("general.architecture") is None
    assert r.get_field(gguf.Keys.IMatrix.DATASETS).contents() == ["calib.txt"]
    assert r.get_field(gguf.Keys.IMatrix.CHUNK_COUNT).contents() == 2
    assert r.get_field(gguf.Keys.IMatrix.CHUNK_SIZE).contents() == 512
    t = {t.name: t for t in r.tensors}
    assert list(t["blk.0.attn_q.weight.in_sum2"].shape) == [256, 1]
    assert list(t["blk.0.attn_q.weight.counts"].shape) == [1, 1]
    assert float(np.asarray(t["blk.0.attn_q.weight.counts"].data).ravel()[0]) == 1000.0


def test_not_gguf(tmp_path, source_file):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(UserError, match="not a GGUF file"):
        ggufio.read_header(bad)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(source_file.read_bytes()[:-1000])
    with pytest.raises(UserError, match="not a GGUF file"):
        ggufio.read_header(cut)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="not a GGUF file"):
        ggufio.read_header(empty)


def test_tensor_type_args():
    args = ggufio.tensor_type_args({"blk.0.attn_q.weight": "Q4_K", "token_embd.weight": "Q8_0"})
    assert args == ["--tensor-type", r"^blk\.0\.attn_q\.weight$=Q4_K", "--token-embedding-type", "Q8_0"]
    assert ggufio.tensor_type_args({"output.weight": "Q6_K"}) == ["--output-tensor-type", "Q6_K"]


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q5_0", "Q5_1",
                                   "IQ4_NL", "IQ4_XS"])
def test_libgguf_dequantize_matches_gguf_py(qtype):
    rng = np.random.default_rng(3)
    x = rng.standard_t(df=4, size=(4, 256)).astype(np.float32)
    imatrix = rng.random(256).astype(np.float32) + 0.01
    raw = types.quantize(x, qtype, imatrix)
    ours = types.dequantize(raw, qtype, 256)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])
    assert ours.shape == ref.shape == (4, 256)
    assert np.array_equal(ours.view(np.uint32), np.asarray(ref, np.float32).view(np.uint32))
