"""qdsl's one-pass fake-quant kernels (``qdsl_fakequant.cpp``) against the torch maths
(``qdsl.quant.primitives.fake_quantize``): bit-identical on every instruction-set path
this CPU runs, and the runtime modules take them exactly where they may."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qdsl.config.spec import ACTIVATION, PerGroup, PerTensor, PerToken, TensorSpec
from qdsl.quant.primitives import choose_qparams, fake_quantize, qrange, reduce_range
from qdsl.runtime import kernels
from qdsl.runtime.fakequant import DynamicFakeQuant, FakeQuant
from qdsl.runtime.kernels import cext

EXT = cext.load()
ISAS = list(range(kernels.capability().isa + 1)) if EXT else []   # generic .. this CPU's
needs_ext = pytest.mark.skipif(not EXT, reason=f"qdsl's C++ kernels unavailable: {cext.why_not()}")
GRIDS = [(b, s) for b in (2, 4, 8, 16) for s in (True, False)]


def _x(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 3
    x.view(-1)[::max(1, x.numel() // 5)] *= 40          # a few outliers, as activations have
    return x


def _static_params(x, axis, bits, sym, g):
    qmin, qmax = qrange(bits, sym)
    if axis == -1:
        return choose_qparams(x.min() * 0.7, x.max() * 0.7, bits, sym)   # some values clip
    if axis == 0:
        lo, hi = reduce_range(x, PerToken(), ACTIVATION)
        return choose_qparams(lo * 0.5, hi * 0.5, bits, sym)
    d = x.shape[-1]
    scale = torch.rand(d, generator=g) * 0.3 + 0.01
    zp = (torch.zeros(d, dtype=torch.int32) if sym
          else torch.randint(qmin, qmax + 1, (d,), generator=g, dtype=torch.int32))
    return scale, zp


@needs_ext
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 17), (2, 5, 576), (4, 33, 1536)])
@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_static_fake_quant_is_bit_identical_on_every_path(shape, axis):
    """Frozen parameters (one pair, per row, per column), every grid, every path: the
    values torch's fused fake-quant / qdsl's reference maths give, bit for bit (ties
    round to even; clipped values land on qmin / qmax)."""
    x = _x(shape, len(shape) + axis)
    g = torch.Generator().manual_seed(1)
    for bits, sym in GRIDS:
        scale, zp = _static_params(x, axis, bits, sym, g)
        ref = fake_quantize(x, scale, zp, bits, sym)
        qmin, qmax = qrange(bits, sym)
        for isa in ISAS:
            y = torch.ops.qdsl_kernels.fake_quant(x, scale, zp, axis, qmin, qmax, isa)
            assert torch.equal(y, ref), f"bits {bits} sym {sym} isa {isa}"


@needs_ext
@pytest.mark.parametrize("shape", [(1,), (9,), (3, 17), (2, 5, 576), (4, 33, 1536)])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_dynamic_fake_quant_is_bit_identical_on_every_path(shape, per_token, threads):
    """The tensor's own min-max range (whole, or per token) and choose_qparams' scale and
    zero point, then the pass: DynamicFakeQuant's four torch calls, bit for bit; the
    per-tensor range is reduced over chunks in parallel, so 2 threads are checked too."""
    x = _x(shape, len(shape))
    gran = PerToken() if per_token else PerTensor()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for bits, sym in GRIDS:
            scale, zp = choose_qparams(*reduce_range(x, gran, ACTIVATION), bits, sym)
            ref = fake_quantize(x, scale, zp, bits, sym)
            qmin, qmax = qrange(bits, sym)
            for isa in ISAS:
                y = torch.ops.qdsl_kernels.dynamic_fake_quant(x, per_token, qmin, qmax, sym, isa)
                assert torch.equal(y, ref), f"bits {bits} sym {sym} isa {isa}"
    finally:
        torch.set_num_threads(old)


@needs_ext
@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=70),
       scale=st.floats(2.0 ** -20, 1024.0, width=32), zp=st.integers(0, 255),
       sym=st.booleans())
def test_fake_quant_matches_torch_for_any_values(values, scale, zp, sym):
    """Any finite values and scale (hypothesis): every path equals torch's fused
    per-tensor fake-quant, the function qdsl's fake_quantize calls for one pair."""
    x = torch.tensor(values, dtype=torch.float32)
    zp = 0 if sym else zp
    qmin, qmax = qrange(8, sym)
    s, z = torch.tensor(scale, dtype=torch.float32), torch.tensor(zp, dtype=torch.int32)
    ref = torch.fake_quantize_per_tensor_affine(x, s, z, qmin, qmax)
    for isa in ISAS:
        assert torch.equal(torch.ops.qdsl_kernels.fake_quant(x, s, z, -1, qmin, qmax, isa), ref)


@needs_ext
def test_non_finite_values_go_where_torch_sends_them():
    """NaN to qmin (torch's per-tensor kernel: fmax(NaN, qmin)), +-inf to the grid's ends,
    ties to even, on every path (lengths past a vector width reach the vector code)."""
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.5, -0.5, 1.5, 2.5, -2.5] * 5)
    s, z = torch.tensor(1.0), torch.tensor(3, dtype=torch.int32)
    ref = torch.fake_quantize_per_tensor_affine(x, s, z, 0, 15)
    assert ref[:8].tolist() == [-3.0, 12.0, -3.0, 0.0, 0.0, 2.0, 2.0, -2.0]
    for isa in ISAS:
        assert torch.equal(torch.ops.qdsl_kernels.fake_quant(x, s, z, -1, 0, 15, isa), ref)


@needs_ext
def test_ops_trace_on_fake_tensors():
    """Schemas and shape functions agree (torch.library.opcheck), so a compiled or exported
    graph holding a FakeQuant module traces through the kernels."""
    x = _x((2, 3, 40), 0)
    s, z = choose_qparams(x.min(), x.max(), 8, False)
    torch.library.opcheck(torch.ops.qdsl_kernels.fake_quant.default,
                          (x, s, z, -1, 0, 255, kernels.capability().isa))
    torch.library.opcheck(torch.ops.qdsl_kernels.dynamic_fake_quant.default,
                          (x, True, -127, 127, True, kernels.capability().isa))


def _spec(granularity, bits=8, sym=True, dynamic=False) -> TensorSpec:
    return TensorSpec(ACTIVATION, bits, symmetric=sym, granularity=granularity, dynamic=dynamic)


@needs_ext
def test_modules_run_the_kernel_and_keep_their_values(monkeypatch):
    """FakeQuant and DynamicFakeQuant (per tensor, per token) give what they gave through
    torch, and no longer call torch's fake-quant for a float32 activation without grad."""
    x = _x((2, 6, 64), 3)
    s, z = choose_qparams(x.min(), x.max(), 8, False)
    mods = [FakeQuant(_spec(PerTensor(), sym=False), s, z),
            DynamicFakeQuant(_spec(PerToken(), dynamic=True)),
            DynamicFakeQuant(_spec(PerTensor(), bits=4, sym=False, dynamic=True))]
    refs = [m(x) for m in mods]
    called = []
    monkeypatch.setattr(kernels, "fake_quant", lambda *a: called.append(a) or None)
    monkeypatch.setattr(kernels, "dynamic_fake_quant", lambda *a: called.append(a) or None)
    assert all(torch.equal(m(x), r) for m, r in zip(mods, refs))   # the torch maths
    assert len(called) == 3                                          # each asked the kernel
    monkeypatch.undo()

    def refuse(*a, **k):
        raise AssertionError("torch's fake-quant ran")
    monkeypatch.setattr(torch, "fake_quantize_per_tensor_affine", refuse)
    monkeypatch.setattr(torch, "fake_quantize_per_channel_affine", refuse)
    assert all(torch.equal(m(x), r) for m, r in zip(mods, refs))


def test_gradients_and_other_shapes_keep_the_torch_maths():
    """A gradient to keep (the straight-through mask), 1-bit grids, float16 inputs and
    parameters that vary along another axis are not the kernel's: None, so the module
    runs the torch maths (and the gradient is still the straight-through one)."""
    x = _x((3, 8), 0).requires_grad_()
    s, z = torch.tensor(0.5), torch.tensor(0, dtype=torch.int32)
    assert kernels.fake_quant(x, s, z, 8, True) is None
    assert kernels.fake_quant(x.detach(), s, z, 1, True) is None
    assert kernels.fake_quant(x.detach().half(), s, z, 8, True) is None
    per_dim0 = torch.rand(3, 1, 1) + 0.1        # [3, 1, 1] against [3, 8]: broadcasts wider
    assert kernels.fake_quant(x.detach(), per_dim0, torch.zeros(3, 1, 1, dtype=torch.int32),
                              8, True) is None
    y = FakeQuant(_spec(PerTensor()), torch.tensor(0.05), torch.tensor(0))(x)
    y.sum().backward()
    assert torch.equal(x.grad, ((x.detach() / 0.05).round().abs() <= 127).float())
    peg = DynamicFakeQuant(_spec(PerGroup(2), dynamic=True))   # PEG: the torch maths
    assert peg(x.detach()).shape == x.shape
