import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evopress.compressors.gptq import (
    QuantGrid,
    QuantizedWeight,
    gptq_quantize,
    gptq_quantize_levels,
    quantize_rtn,
)
from evopress.compressors.packing import pack_codes, unpack_codes


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_codes(shape: tuple[int, ...], bits: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 1 << bits, shape, generator=_gen(seed), dtype=torch.uint8)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(0, 67), seed=st.integers(0, 2**16))
def test_pack_roundtrip_and_size(bits, n, seed):
    codes = _random_codes((n,), bits, seed)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, (n,)), codes)


def test_pack_bit_order_is_little_endian():
    # 3-bit codes 1, 2, 7 -> stream bits 100 010 111 (LSB first) -> bytes 0b11010001, 0b1
    packed = pack_codes(torch.tensor([1, 2, 7], dtype=torch.uint8), 3)
    assert packed.tolist() == [0b11010001, 0b1]


def test_pack_multidim_shape():
    codes = _random_codes((3, 5, 7), 5, 0)
    assert torch.equal(unpack_codes(pack_codes(codes, 5), 5, codes.shape), codes)


def test_pack_validation():
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([4], dtype=torch.uint8), 2)
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([0], dtype=torch.uint8), 9)
    with pytest.raises(ValueError):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, (8,))


def _correlated_layer(out: int, n: int, seed: int, samples: int = 512):
    """Weights and inputs X = Z A whose Hessian XᵀX is far from diagonal."""
    g = _gen(seed)
    W = torch.randn(out, n, generator=g)
    A = torch.randn(n, n, generator=g) / math.sqrt(n) + 0.3 * torch.eye(n)
    X = torch.randn(samples, n, generator=g) @ A
    return W, X, X.T @ X


def _output_err(X, W, q: QuantizedWeight) -> float:
    return (X @ W.T - X @ q.dequantize().T).pow(2).sum().item()


@pytest.mark.parametrize("group_size", [128, -1])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn(group_size, act_order):
    W, X, H = _correlated_layer(32, 256, seed=1)
    grids = [QuantGrid(bits, group_size) for bits in (2, 3, 4)]
    for grid, q in zip(grids, gptq_quantize_levels(W, H, grids, act_order=act_order)):
        gptq_err, rtn_err = _output_err(X, W, q), _output_err(X, W, quantize_rtn(W, grid))
        assert gptq_err < 0.9 * rtn_err, (grid, gptq_err, rtn_err)


def test_gptq_result_independent_of_block_size():
    # Lazy batch updates are exact, so the block size must not change the result, even
    # when groups of 64 straddle blocks of 48 (group params must see pending feedback).
    W, _, H = _correlated_layer(16, 192, seed=2)
    grid = QuantGrid(3, 64)
    ref = gptq_quantize(W, H, grid, block_size=192)
    for block_size in (48, 7):
        q = gptq_quantize(W, H, grid, block_size=block_size)
        assert (q.codes == ref.codes).float().mean() > 0.99
        assert torch.allclose(q.scales.float(), ref.scales.float(), rtol=1e-2)


def test_act_order_keeps_original_column_order():
    # With a diagonal H there is no error feedback, so GPTQ with static groups is RTN;
    # any column permutation left in the result would break the equality.
    W = torch.randn(8, 256, generator=_gen(3))
    H = torch.diag(torch.rand(256, generator=_gen(4)) + 0.1)
    for grid in (QuantGrid(3, 64), QuantGrid(4, -1)):
        q, rtn = gptq_quantize(W, H, grid, act_order=True), quantize_rtn(W, grid)
        assert torch.equal(q.codes, rtn.codes)
        assert torch.equal(q.dequantize(), rtn.dequantize())


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_codes_in_range_and_input_untouched(bits, symmetric):
    W, _, H = _correlated_layer(8, 128, seed=5, samples=64)
    W_before, H_before = W.clone(), H.clone()
    grid = QuantGrid(bits, 32, symmetric)
    for q in (gptq_quantize(W, H, grid), gptq_quantize(W, H, grid, act_order=True), quantize_rtn(W, grid)):
        assert q.codes.dtype == torch.uint8 and q.codes.shape == W.shape
        assert int(q.codes.max()) <= grid.maxq and int(q.zeros.max()) <= grid.maxq
        assert q.scales.dtype == torch.float16 and q.scales.shape == (8, 4)
    assert torch.equal(W, W_before) and torch.equal(H, H_before)


def test_rtn_values_on_grid_and_within_half_step():
    W = torch.randn(16, 256, generator=_gen(6)) * torch.rand(16, 1, generator=_gen(7))
    W[0, :128] = 0  # all-zero group
    for grid in (QuantGrid(3, 128), QuantGrid(4, -1), QuantGrid(2, 64)):
        q = quantize_rtn(W, grid)
        gs = grid.group_len(256)
        deq = q.dequantize().view(16, -1, gs)
        scale = q.scales.float()[..., None]
        steps = deq / scale + q.zeros.float()[..., None]
        assert torch.allclose(steps, steps.round(), atol=1e-4)
        assert steps.min() >= 0 and steps.max() <= grid.maxq
        assert ((W.view(16, -1, gs) - deq).abs() <= scale / 2 * (1 + 1e-5)).all()
        assert (q.dequantize()[0, :128] == 0).all()


def test_packed_roundtrip_exact():
    W, _, H = _correlated_layer(8, 96, seed=8, samples=64)
    for grid in (QuantGrid(3, 32), QuantGrid(5, -1), QuantGrid(4, 48, symmetric=True)):
        q = gptq_quantize(W, H, grid)
        d = q.to_packed()
        assert d["codes"].numel() == math.ceil(W.numel() * grid.bits / 8)
        r = QuantizedWeight.from_packed(d, tuple(W.shape), grid)
        assert torch.equal(r.codes, q.codes) and torch.equal(r.zeros, q.zeros)
        assert torch.equal(r.scales, q.scales)
        assert torch.equal(r.dequantize(torch.float16), q.dequantize(torch.float16))


@pytest.mark.parametrize("act_order", [False, True])
def test_levels_equal_single_calls(act_order):
    W, _, H = _correlated_layer(8, 128, seed=9, samples=64)
    grids = [QuantGrid(2, 64), QuantGrid(4, -1), QuantGrid(3, 32, symmetric=True)]
    for grid, q in zip(grids, gptq_quantize_levels(W, H, grids, act_order=act_order)):
        single = gptq_quantize(W, H, grid, act_order=act_order)
        assert torch.equal(q.codes, single.codes) and torch.equal(q.scales, single.scales)
        assert torch.equal(q.zeros, single.zeros)


def test_dead_columns_are_zeroed():
    W, X, _ = _correlated_layer(8, 64, seed=10, samples=128)
    X[:, [3, 40]] = 0
    for act_order in (False, True):
        q = gptq_quantize(W, X.T @ X, QuantGrid(4, 32), act_order=act_order)
        assert (q.dequantize()[:, [3, 40]] == 0).all()


def test_validation_errors():
    W, H = torch.randn(4, 64), torch.eye(64)
    for bits in (0, 9):
        with pytest.raises(ValueError):
            QuantGrid(bits)
    with pytest.raises(ValueError):
        quantize_rtn(W, QuantGrid(4, 48))  # 48 does not divide 64
    with pytest.raises(ValueError):
        gptq_quantize(W, torch.eye(32), QuantGrid(4, 32))
    with pytest.raises(ValueError):
        gptq_quantize(W[0], H, QuantGrid(4, 32))
