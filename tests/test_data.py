"""Calibration text: mixtures of sources interleave equal shares."""

import pytest
from transformers import AutoTokenizer

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
