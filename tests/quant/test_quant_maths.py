"""Properties of the quantizer maths (qdsl/quant/primitives.py)."""

from __future__ import annotations

from contextlib import contextmanager
from unittest.mock import patch

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import activations, bit_widths, float_tensors, matrices, multibit_widths, ranges

from qdsl.quant.primitives import (binarize, choose_qparams, dequantize, dim_range, fake_quantize,
                                   group_unview, group_view, inverse_permutation, peg_permutation,
                                   qrange, quantize, reduce_range)
from qdsl.config.spec import ACTIVATION, WEIGHT, GroupWise, PerChannel, PerGroup, PerTensor, PerToken


def _clip_range(scale, zero_point, bits, symmetric):
    qmin, qmax = qrange(bits, symmetric)
    return (qmin - zero_point) * scale, (qmax - zero_point) * scale


# --- grids and qparams -------------------------------------------------------------


def test_grids():
    assert qrange(8, True) == (-127, 127) and qrange(8, False) == (0, 255)
    assert qrange(4, True) == (-7, 7) and qrange(2, True) == (-1, 1)
    assert qrange(1, True) == (-1, 1) and qrange(1, False) == (0, 1)
    assert qrange(16, False) == (0, 65535)
    with pytest.raises(ValueError, match="1..16"):
        qrange(0, True)


def test_qrange_checks_bits_with_the_specs_one_validator():
    from qdsl.config.spec import SpecError, TensorPatch, TensorSpec, check_bits
    for bad in (0, 17, 32, True, 8.0):   # 32 is a rule's "keep float", not a grid
        for make in (lambda b: qrange(b, True), check_bits,
                     lambda b: TensorSpec("weight", b)):
            with pytest.raises(SpecError, match="bits must be 1..16"):
                make(bad)
    assert TensorPatch(bits=32).bits == check_bits(32, float_ok=True) == 32


def test_worked_example():
    s, z = choose_qparams(torch.tensor(-3.5), torch.tensor(10.2), 4, False)
    assert s.item() == pytest.approx(13.7 / 15) and z.item() == 4 and z.dtype == torch.int32
    x = torch.tensor([-9.0, -3.5, 0.0, 0.4566, 0.4567, 10.2, 20.0])
    assert quantize(x, s, z, 4, False).tolist() == [0, 0, 4, 4, 5, 15, 15]
    s, z = choose_qparams(torch.tensor(-3.5), torch.tensor(10.2), 4, True)
    assert s.item() == pytest.approx(10.2 / 7) and z.item() == 0


def test_scale_floor_and_shapes():
    s, z = choose_qparams(torch.zeros(3, 1), torch.zeros(3, 1), 8, False)
    assert s.shape == z.shape == (3, 1) and (s == 1e-8).all() and (z == 0).all()
    assert (fake_quantize(torch.zeros(3, 4), s, z, 8, False) == 0).all()


@given(ranges(), multibit_widths)
def test_zero_exactly_representable_asymmetric(rng, bits):
    s, z = choose_qparams(*rng, bits, False)
    assert quantize(torch.zeros(1), s, z, bits, False).item() == z.item()
    assert fake_quantize(torch.zeros(1), s, z, bits, False).item() == 0.0
    lo, hi = _clip_range(s, z, bits, False)
    assert lo <= 0 <= hi


# --- quantize / dequantize / fake_quantize ----------------------------------------


@given(float_tensors(), ranges(), multibit_widths, st.booleans())
def test_roundtrip_within_half_step_inside_range(x, rng, bits, symmetric):
    """|dequantize(quantize(x)) - x| <= scale/2 (up to float32 rounding of x/scale)."""
    s, z = choose_qparams(*rng, bits, symmetric)
    x_hat = dequantize(quantize(x, s, z, bits, symmetric), s, z)
    lo, hi = _clip_range(s, z, bits, symmetric)
    inside = (x >= lo) & (x <= hi)
    err = (x_hat - x).abs()[inside]
    assert (err <= s * 0.5 * (1 + 1e-2) + 1e-6 * x.abs()[inside]).all(), (s, err.max())
    assert torch.equal(x_hat, fake_quantize(x, s, z, bits, symmetric))


@given(float_tensors(), ranges(), bit_widths, st.booleans())
def test_outside_values_clamp_to_range_ends(x, rng, bits, symmetric):
    s, z = choose_qparams(*rng, bits, symmetric)
    lo, hi = _clip_range(s, z, bits, symmetric)
    y = fake_quantize(x, s, z, bits, symmetric)
    assert (y[x > hi + s] == hi).all() and (y[x < lo - s] == lo).all()
    assert (y >= lo).all() and (y <= hi).all()


@given(float_tensors(), ranges(), bit_widths, st.booleans())
def test_fake_quantize_idempotent(x, rng, bits, symmetric):
    s, z = choose_qparams(*rng, bits, symmetric)
    y = fake_quantize(x, s, z, bits, symmetric)
    assert torch.equal(fake_quantize(y, s, z, bits, symmetric), y)


@given(float_tensors(), ranges(), multibit_widths)
def test_symmetric_grid_is_odd(x, rng, bits):
    """Narrow symmetric grid: -x quantizes to -q (ties round half to even both ways)."""
    s, z = choose_qparams(*rng, bits, True)
    assert torch.equal(quantize(-x, s, z, bits, True), -quantize(x, s, z, bits, True))


@given(ranges(), st.integers(1, 11), st.booleans())
def test_more_bits_never_increase_worst_case_error(rng, bits, symmetric):
    """On one fixed range R (the widened range for asym, [-A, A] for sym):
    scale(b+1) <= scale(b), and the worst-case error over a dense sweep of R at b+1
    bits is <= the one at b bits. Pointwise the error can grow (the grids are not
    nested: x = A/3 is exact at 3 bits sym, A/21 off at 4), so the sup is what we test."""
    lo, hi = rng
    if symmetric:
        a = torch.maximum(lo.abs(), hi.abs())
        lo, hi = -a, a
    else:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    x = torch.linspace(lo.item(), hi.item(), 16385)
    s1, z1 = choose_qparams(lo, hi, bits, symmetric)
    s2, z2 = choose_qparams(lo, hi, bits + 1, symmetric)
    e1 = (fake_quantize(x, s1, z1, bits, symmetric) - x).abs().max()
    e2 = (fake_quantize(x, s2, z2, bits + 1, symmetric) - x).abs().max()
    assert s2 <= s1
    assert e2 <= e1 + 1e-6 * (hi - lo), (e1, e2)


@given(float_tensors(), ranges(), bit_widths, st.booleans())
def test_straight_through_gradient(x, rng, bits, symmetric):
    """d fake_quantize / dx = 1 where round(x/s) + z is on the grid, 0 where clamped
    (the same mask as torch's); 1 everywhere for 1-bit symmetric (XTC)."""
    s, z = choose_qparams(*rng, bits, symmetric)
    x = x.clone().requires_grad_(True)
    fake_quantize(x, s, z, bits, symmetric).sum().backward()
    qmin, qmax = qrange(bits, symmetric)
    if bits == 1 and symmetric:
        expected = torch.ones_like(x)
    else:
        q = torch.round(x.detach() * (1.0 / s)) + z
        expected = ((q >= qmin) & (q <= qmax)).float()
        xt = x.detach().clone().requires_grad_(True)
        torch.fake_quantize_per_tensor_affine(xt, s.reshape(1), z.reshape(1), qmin, qmax).sum() \
            .backward()
        assert torch.equal(xt.grad, expected)
    assert torch.equal(x.grad, expected)


# --- agreement with torch -------------------------------------------------------------


# fake_quantize hands float32 per-tensor / per-channel inputs to torch's fused kernels, so
# comparing it with those kernels there compares torch with itself. These tests run qdsl's
# own maths (the fallback used for other dtypes, meta tensors and other shapes of
# parameters) on the same inputs, with the fused path switched off, and compare.


@contextmanager
def _reference_maths():
    """fake_quantize with its fused fast path disabled (patched in the module that defines
    fake_quantize, wherever that is); fails unless the fast path was really consulted."""
    calls = []

    def no_fused(*args):
        calls.append(args)
        return None

    with patch.dict(fake_quantize.__globals__, {"_fused_fake_quantize": no_fused}):
        yield
    assert calls, "fake_quantize no longer consults _fused_fake_quantize: update this test"


@given(float_tensors(), ranges(), bit_widths, st.booleans())
def test_reference_maths_agrees_with_torch_per_tensor(x, rng, bits, symmetric):
    """Our grid as torch's (quant_min, quant_max); symmetric = zero point 0 on the narrow
    grid, e.g. [-127, 127]. 1-bit symmetric ({-1, +1}, no zero) is not affine: skipped.
    Values and straight-through gradients agree bit for bit."""
    if bits == 1 and symmetric:
        return
    s, z = choose_qparams(*rng, bits, symmetric)
    qmin, qmax = qrange(bits, symmetric)
    xt = x.clone().requires_grad_(True)
    ref = torch.fake_quantize_per_tensor_affine(xt, s.reshape(1), z.reshape(1), qmin, qmax)
    ref.sum().backward()
    xr = x.clone().requires_grad_(True)
    with _reference_maths():
        ours = fake_quantize(xr, s, z, bits, symmetric)
        no_grad = fake_quantize(x, s, z, bits, symmetric)  # the branch without autograd
    ours.sum().backward()
    assert torch.equal(ours.detach(), ref.detach()) and torch.equal(no_grad, ref.detach())
    assert torch.equal(xr.grad, xt.grad)


@given(matrices(), multibit_widths, st.booleans())
def test_reference_maths_agrees_with_torch_per_channel(w, bits, symmetric):
    s, z = choose_qparams(*reduce_range(w, PerChannel(), WEIGHT), bits, symmetric)  # [out, 1]
    qmin, qmax = qrange(bits, symmetric)
    ref = torch.fake_quantize_per_channel_affine(w, s[:, 0], z[:, 0], 0, qmin, qmax)
    with _reference_maths():
        ours = fake_quantize(w, s, z, bits, symmetric)
    assert torch.equal(ours, ref)
    # and the fast path (what float32 weights get) agrees with it too
    assert torch.equal(fake_quantize(w, s, z, bits, symmetric), ours)


@pytest.mark.parametrize("symmetric", [True, False])
def test_reference_maths_rounds_ties_as_torch(symmetric):
    """Exact halfway points (a power-of-two scale keeps them exact) round to even, as
    torch's kernel does: half-up rounding differs on every other one."""
    x = (torch.arange(-24, 24, dtype=torch.float32) + 0.5) * 0.25
    s, z = torch.tensor(0.25), torch.tensor(0 if symmetric else 3, dtype=torch.int32)
    qmin, qmax = qrange(8, symmetric)
    ref = torch.fake_quantize_per_tensor_affine(x, s, z, qmin, qmax)
    with _reference_maths():
        ours = fake_quantize(x, s, z, 8, symmetric)
    assert torch.equal(ours, ref)


@given(matrices(), multibit_widths, st.booleans())
def test_other_dtypes_take_the_reference_maths(w, bits, symmetric):
    """float64 inputs never reach the fused kernels: the result (on float32 values) is
    torch's, cast."""
    s, z = choose_qparams(*reduce_range(w, PerChannel(), WEIGHT), bits, symmetric)
    qmin, qmax = qrange(bits, symmetric)
    ref = torch.fake_quantize_per_channel_affine(w, s[:, 0], z[:, 0], 0, qmin, qmax)
    ours = fake_quantize(w.double(), s, z, bits, symmetric)
    assert ours.dtype == torch.float64 and torch.equal(ours.float(), ref)


# --- granularity ------------------------------------------------------------------


@given(matrices(max_rows=1), bit_widths, st.booleans())
def test_one_channel_equals_per_tensor(w, bits, symmetric):
    pc = choose_qparams(*reduce_range(w, PerChannel(), WEIGHT), bits, symmetric)
    pt = choose_qparams(*reduce_range(w, PerTensor(), WEIGHT), bits, symmetric)
    assert pc[0].shape == (1, 1) and pt[0].shape == ()
    assert torch.equal(fake_quantize(w, *pc, bits, symmetric),
                       fake_quantize(w, *pt, bits, symmetric))


@given(activations(), st.booleans())
def test_peg_k1_is_per_tensor_and_kd_is_per_dim(x, permute):
    d = x.shape[-1]
    lo, hi = reduce_range(x, PerGroup(1, permute), ACTIVATION)
    assert lo.shape == (d,) and (lo == x.min()).all() and (hi == x.max()).all()
    lo, hi = reduce_range(x, PerGroup(d, permute), ACTIVATION)
    dmin, dmax = dim_range(x)
    assert torch.equal(lo, dmin) and torch.equal(hi, dmax)


@given(activations(d_choices=(4, 8, 12)), st.sampled_from([2, 4]))
def test_peg_groups_follow_sorted_ranges(x, k):
    """Each group's range is the min/max over its d/k dims, taken in range-sorted order."""
    d = x.shape[-1]
    lo, hi = reduce_range(x, PerGroup(k, permute=True), ACTIVATION)
    dmin, dmax = dim_range(x)
    perm = peg_permutation(dmin, dmax)
    assert ((dmax - dmin)[perm].diff() >= 0).all()
    for g in perm.reshape(k, d // k):
        assert (lo[g] == dmin[g].min()).all() and (hi[g] == dmax[g].max()).all()


@given(st.permutations(list(range(12))), activations(d_choices=(12,)))
def test_permutation_then_inverse_is_identity(perm, x):
    perm = torch.tensor(perm)
    assert torch.equal(x[..., perm][..., inverse_permutation(perm)], x)
    assert torch.equal(inverse_permutation(inverse_permutation(perm)), perm)


def test_granularity_shapes():
    w, x = torch.randn(6, 8), torch.randn(2, 3, 8)
    assert reduce_range(w, PerTensor(), WEIGHT)[0].shape == ()
    assert reduce_range(w, PerChannel(), WEIGHT)[0].shape == (6, 1)
    assert reduce_range(w, GroupWise(4), WEIGHT)[0].shape == (6, 2, 1)
    assert reduce_range(x, PerToken(), ACTIVATION)[0].shape == (2, 3, 1)
    assert reduce_range(x, PerGroup(2, True), ACTIVATION)[0].shape == (8,)
    assert torch.equal(group_unview(group_view(w, 4)), w)
    assert torch.equal(group_view(w, 4)[1, 1], w[1, 4:])


def test_granularity_errors():
    with pytest.raises(ValueError, match=r"group\(size=3\).*\[6, 8\]"):
        group_view(torch.zeros(6, 8), 3)
    with pytest.raises(ValueError, match=r"per_group\(K=3\).*d = 8"):
        reduce_range(torch.zeros(2, 8), PerGroup(3), ACTIVATION)
    with pytest.raises(ValueError, match="per_token does not apply to weights"):
        reduce_range(torch.zeros(2, 8), PerToken(), WEIGHT)


@given(matrices(col_multiple=4), multibit_widths, st.booleans())
def test_groupwise_equals_per_channel_on_each_slice(w, bits, symmetric):
    """group(size) = per-channel quantization of each [out, size] column block."""
    s, z = choose_qparams(*reduce_range(w, GroupWise(4), WEIGHT), bits, symmetric)
    y = group_unview(fake_quantize(group_view(w, 4), s, z, bits, symmetric))
    for j in range(w.shape[1] // 4):
        blk = w[:, 4 * j:4 * j + 4]
        sb, zb = choose_qparams(*reduce_range(blk, PerChannel(), WEIGHT), bits, symmetric)
        assert torch.equal(y[:, 4 * j:4 * j + 4], fake_quantize(blk, sb, zb, bits, symmetric))


# --- 1 bit ----------------------------------------------------------------------------


def test_binarize_worked_example():
    w = torch.tensor([[0.5, -1.5], [0.0, 2.0]])
    assert torch.equal(binarize(w), torch.tensor([[1.0, -1.0], [1.0, 1.0]]))
    assert torch.equal(quantize(w, torch.ones(()), torch.zeros(()), 1, True),
                       torch.tensor([[1, -1], [1, 1]], dtype=torch.int32))


@given(matrices(col_multiple=2))
def test_binarize_is_sign_times_mean_abs(w):
    y = binarize(w, PerChannel())
    alpha = w.abs().mean(1, keepdim=True)
    assert torch.allclose(y, torch.where(w >= 0, 1.0, -1.0) * alpha)
    yg = binarize(w, GroupWise(2))
    assert torch.allclose(yg.abs(), w.abs().reshape(-1, 2).mean(1).repeat_interleave(2)
                          .reshape(w.shape))
