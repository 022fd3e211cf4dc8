"""GPTQ and AWQ maths (qdsl/quant/gptq.py, awq.py, hessian.py, weights.py).

The losses are measured directly on the calibration inputs X ([n, in]): the output
error of rounded weights W_hat is ``2/n * sum_t ||(W_hat - W) x_t||^2`` (the same
quantity as ``tr(D H D^T)`` with ``H = 2 X^T X / n``, but computed here from X, not
from H, so a wrong H or a wrong loss in the code would show).

Tolerance of "never worse": relative 1e-5 of the RTN error plus 1e-9 absolute. GPTQ and
AWQ guard their result with ``output_error`` in float64; the test recomputes the error
in float64 from X, so the two differ only by float rounding of the inputs.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qdsl.config.rounding import AWQ, GPTQ
from qdsl.config.spec import GroupWise, PerChannel, PerTensor, TensorSpec
from qdsl.quant.awq import awq_codes, awq_scales
from qdsl.quant.gptq import gptq_codes
from qdsl.quant.hessian import InputStats
from qdsl.quant.primitives import qrange
from qdsl.quant.weights import dequantize_codes, output_error, rtn_codes

REL, ABS = 1e-5, 1e-9


def _err(w_hat: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> float:
    d = (w_hat.double() - w.double())
    return float((x.double() @ d.T).square().sum() * 2 / x.shape[0])


@st.composite
def layers(draw, max_out: int = 8):
    """(w [out, in], x [n, in], spec without rounding): random sizes, correlated inputs
    with channel scales over three decades, sometimes fewer tokens than inputs (a
    singular H) and sometimes dead input channels."""
    group = draw(st.sampled_from([None, 4, 8]))
    cols = draw(st.integers(1, 4)) * (group or draw(st.sampled_from([3, 8])))
    out = draw(st.integers(1, max_out))
    n = draw(st.sampled_from([2, cols // 2 + 1, 4 * cols]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) * draw(st.sampled_from([0.0, 0.3, 1.0]))
    x = torch.randn(n, cols, generator=g) @ (torch.eye(cols) + mix)
    x = x * torch.logspace(-1, 2, cols)[torch.randperm(cols, generator=g)]
    if draw(st.booleans()):
        x[:, : max(1, cols // 4)] = 0.0  # inputs never seen non-zero
    w = torch.randn(out, cols, generator=g) * draw(st.sampled_from([0.02, 1.0]))
    gran = GroupWise(group) if group else draw(st.sampled_from([PerChannel(), PerTensor()]))
    spec = TensorSpec(kind="weight", bits=draw(st.integers(2, 8)), symmetric=draw(st.booleans()),
                      granularity=gran)
    return w, x, spec


def _hessian(x: torch.Tensor) -> torch.Tensor:
    stats = InputStats()
    for part in x.split(3):
        stats(part.view(1, -1, x.shape[1]))
    return stats.hessian()


@settings(max_examples=60, deadline=None)
@given(layers(), st.floats(1e-3, 1.0), st.sampled_from([1, 2, 8, 128]), st.booleans())
def test_gptq_is_never_worse_than_round_to_nearest_on_the_calibration_inputs(
        layer, damp, block, act_order):
    w, x, spec = layer
    gspec = TensorSpec(**{**spec.__dict__, "rounding": GPTQ(damp, block, act_order)})
    q, scale, zp, stats = gptq_codes(w, _hessian(x), gspec)
    rq, rscale, rzp = rtn_codes(w, spec)
    rtn = _err(dequantize_codes(rq, spec, rscale, rzp), w, x)
    got = _err(dequantize_codes(q, spec, scale, zp), w, x)
    assert got <= rtn * (1 + REL) + ABS
    qmin, qmax = qrange(spec.bits, spec.symmetric)
    assert q.dtype == torch.int32 and q.shape == w.shape
    assert int(q.min()) >= qmin and int(q.max()) <= qmax          # on the spec's grid
    assert scale.shape == rscale.shape and bool((scale > 0).all())
    assert abs(stats.error - got) <= 1e-4 * max(got, 1e-6)         # its own loss is the real one


@settings(max_examples=60, deadline=None)
@given(layers(), st.integers(1, 12), st.booleans())
def test_awq_is_never_worse_than_scale_one_and_exact_in_float(layer, grid, clip):
    w, x, spec = layer
    aspec = TensorSpec(**{**spec.__dict__, "rounding": AWQ(grid, clip)})
    q, scale, zp, s, stats = awq_codes(w, _hessian(x), x.abs().mean(0), aspec)
    rq, rscale, rzp = rtn_codes(w, spec)
    rtn = _err(dequantize_codes(rq, spec, rscale, rzp), w, x)
    w_hat = dequantize_codes(q, spec, scale, zp)          # the weight the linear holds: ~ W diag(s)
    got = _err(w_hat / s, w, x)
    assert got <= rtn * (1 + REL) + ABS
    assert bool((s > 0).all()) and s.shape == (w.shape[1],)
    # the graph computes (W_hat) (x / s): the same as (W_hat / s) x up to float rounding
    y_graph = (x * (1.0 / s)) @ w_hat.T
    assert torch.allclose(y_graph, x @ (w_hat / s).T, rtol=1e-4, atol=1e-4 * float(y_graph.abs().max()))
    qmin, qmax = qrange(spec.bits, spec.symmetric)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax


def _correlated(out=32, cols=128, n=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=g) @ (torch.randn(cols, cols, generator=g) / cols ** 0.5)
    x = x * torch.rand(cols, generator=g) * 3
    return torch.randn(out, cols, generator=g), x


@pytest.mark.parametrize("gran", [PerChannel(), GroupWise(32)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_clearly_beats_round_to_nearest_on_correlated_inputs(gran, act_order):
    """Not only the guard: the column updates themselves cut the error (2x here, 4 bits)."""
    w, x = _correlated()
    spec = TensorSpec(kind="weight", bits=4, granularity=gran)
    gspec = TensorSpec(kind="weight", bits=4, granularity=gran,
                       rounding=GPTQ(block=32, act_order=act_order))
    q, scale, zp, stats = gptq_codes(w, _hessian(x), gspec)
    rq, rscale, rzp = rtn_codes(w, spec)
    rtn = _err(dequantize_codes(rq, spec, rscale, rzp), w, x)
    assert _err(dequantize_codes(q, spec, scale, zp), w, x) < 0.7 * rtn
    assert stats.rows_rtn < stats.rows // 4


def test_gptq_with_a_diagonal_hessian_is_round_to_nearest():
    """Uncorrelated inputs: H^-1 is diagonal, no error spreads, GPTQ's codes are RTN's
    (per channel: the same scales; groups: scales of unchanged columns)."""
    g = torch.Generator().manual_seed(3)
    w, h = torch.randn(6, 16, generator=g), torch.diag(torch.rand(16, generator=g) + 0.1)
    for gran in (PerChannel(), GroupWise(4), PerTensor()):
        for act_order in (False, True):
            spec = TensorSpec(kind="weight", bits=3, granularity=gran,
                              rounding=GPTQ(act_order=act_order, block=5))
            q, scale, zp, _ = gptq_codes(w, h, spec)
            rq, rscale, rzp = rtn_codes(w, TensorSpec(kind="weight", bits=3, granularity=gran))
            assert torch.equal(q, rq) and torch.equal(scale, rscale)


def test_gptq_dead_inputs_and_a_rank_deficient_hessian_give_finite_codes():
    w, x = _correlated(out=4, cols=16, n=3)
    x[:, 5] = 0.0
    spec = TensorSpec(kind="weight", bits=4, granularity=GroupWise(8), rounding=GPTQ(damp=1e-4))
    q, scale, zp, stats = gptq_codes(w, _hessian(x), spec)
    assert bool(torch.isfinite(scale).all()) and stats.damp >= 1e-4
    assert q.shape == w.shape


def test_awq_with_one_grid_point_is_round_to_nearest():
    w, x = _correlated(out=8, cols=32)
    spec = TensorSpec(kind="weight", bits=4, granularity=GroupWise(8), rounding=AWQ(grid=1))
    q, scale, zp, s, stats = awq_codes(w, _hessian(x), x.abs().mean(0), spec)
    rq, rscale, _ = rtn_codes(w, TensorSpec(kind="weight", bits=4, granularity=GroupWise(8)))
    assert torch.equal(s, torch.ones(32)) and torch.equal(q, rq) and torch.equal(scale, rscale)
    assert stats.alpha == 0.0 and stats.error == stats.rtn_error


def test_awq_helps_when_a_few_input_channels_dominate():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 64, generator=g)
    x[:, :4] *= 30.0                                  # outlier input channels
    w = torch.randn(16, 64, generator=g)
    spec = TensorSpec(kind="weight", bits=4, granularity=GroupWise(32), rounding=AWQ(clip=True))
    q, scale, zp, s, stats = awq_codes(w, _hessian(x), x.abs().mean(0), spec)
    assert stats.alpha > 0 and stats.error < 0.7 * stats.rtn_error
    assert float(s[:4].min()) > float(s[4:].max())    # the outlier channels are protected


def test_awq_scales_are_normalised_and_alpha_zero_is_ones():
    m = torch.tensor([0.1, 1.0, 10.0, 0.0])
    assert torch.equal(awq_scales(m, 0.0), torch.ones(4))
    s = awq_scales(m, 0.5)
    assert abs(float(s.max() * s.min()) - 1.0) < 1e-5 and float(s[2]) > float(s[1]) > float(s[0])


def test_input_stats_accumulate_the_hessian_and_mean_abs_over_batches():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 5, generator=g)
    stats = InputStats()
    with torch.inference_mode():  # as in calibration
        for b in x:
            assert torch.equal(stats(b[None]), b[None])   # passes its input through
    flat = x.reshape(-1, 5)
    assert torch.allclose(stats.hessian(), 2 * flat.T @ flat / 14, atol=1e-5)
    assert torch.allclose(stats.act_mean(), flat.abs().mean(0), atol=1e-6)
    assert torch.allclose(output_error(torch.ones(1, 5), torch.zeros(1, 5), stats.hessian()),
                          (flat.sum(1).square().mean() * 2).double().view(1), atol=1e-4)
    with pytest.raises(RuntimeError, match="no calibration input"):
        InputStats().hessian()
