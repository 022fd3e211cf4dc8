"""The straight-through estimator the training uses (quant.primitives.fake_quantize and
train.qat): gradient 1 where the code lies on the grid, 0 where it was clamped, for each
granularity; 1-bit passes everything; scales get no gradient."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from qdsl.config.spec import ACTIVATION, WEIGHT, GroupWise, PerChannel, PerTensor, PerToken, TensorSpec
from qdsl.runtime.fakequant import DynamicFakeQuant
from qdsl.quant.primitives import fake_quantize, group_unview, group_view, qrange
from qdsl.train.qat import qat_weight

GRANULARITIES = ["per_tensor", "per_channel", "per_token", "group"]


def _scale(g: str, x: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = {"per_tensor": (), "per_channel": (x.shape[0], 1), "per_token": (x.shape[0], 1),
             "group": (x.shape[0], x.shape[1] // 4, 1)}[g]
    return torch.rand(shape, generator=gen) * 0.5 + 0.01


@given(st.sampled_from(GRANULARITIES), st.integers(2, 8), st.booleans(),
       st.integers(1, 6), st.integers(1, 4), st.integers(0, 10_000))
def test_gradient_is_identity_inside_the_range_and_zero_outside(g, bits, symmetric, rows,
                                                                groups, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, groups * 4, generator=gen) * 3).requires_grad_(True)
    scale = _scale(g, x, seed)
    qmin, qmax = qrange(bits, symmetric)
    zp = torch.zeros_like(scale, dtype=torch.int32) if symmetric else \
        torch.full_like(scale, (qmax + 1) // 2, dtype=torch.int32)
    v = group_view(x, 4) if g == "group" else x
    y = fake_quantize(v, scale, zp, bits, symmetric)
    y = group_unview(y) if g == "group" else y
    upstream = torch.randn(x.shape, generator=gen)
    (y * upstream).sum().backward()
    with torch.no_grad():
        q = torch.round(v * (1.0 / scale)) + zp
        inside = ((q >= qmin) & (q <= qmax)).float()
        inside = group_unview(inside) if g == "group" else inside
    assert torch.equal(x.grad, upstream * inside)


@given(st.sampled_from(["per_tensor", "per_channel", "group"]), st.integers(0, 10_000))
def test_binary_passes_every_gradient(g, seed):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(3, 8, generator=gen) * 5).requires_grad_(True)
    gran = {"per_tensor": PerTensor(), "per_channel": PerChannel(), "group": GroupWise(4)}[g]
    spec = TensorSpec(WEIGHT, 1, symmetric=True, granularity=gran)
    y = qat_weight(w, spec)
    upstream = torch.randn(w.shape, generator=gen)
    (y * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)
    # the value is XTC's sign(W) * mean|W| of each row / group
    v = w.detach().reshape(3, -1, 4) if g == "group" else w.detach().reshape(3 if g != "per_tensor" else 1, -1)
    alpha = v.abs().mean(-1, keepdim=True)
    expect = (torch.where(v >= 0, 1.0, -1.0) * alpha).reshape(3, 8)
    torch.testing.assert_close(y.detach(), expect)


@given(st.integers(2, 8), st.integers(0, 10_000))
def test_qat_weight_conv1d_layout_matches_linear(bits, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 8, generator=gen)
    spec = TensorSpec(WEIGHT, bits, symmetric=True, granularity=PerChannel())
    assert torch.equal(qat_weight(w.t().contiguous(), spec, in_out=True).t(), qat_weight(w, spec))


def test_dynamic_per_token_activation_gradient_is_identity():
    # a per-token range taken from the tensor itself puts every value on the grid
    x = torch.randn(2, 5, 16).requires_grad_(True)
    aq = DynamicFakeQuant(TensorSpec(ACTIVATION, 8, symmetric=True, granularity=PerToken(),
                                     dynamic=True))
    aq(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
