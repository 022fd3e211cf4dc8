"""The 1-bit runtime (XTC's binary weights): qdsl_binary.cpp's kernels against the
fake-quant maths on every instruction-set path this CPU has, the packed weight's
memory, BinaryDynamicLinear's JSON round trip, and the fallback without a compiler."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from qdsl.config.spec import ACTIVATION, PerTensor, PerToken, TensorSpec
from qdsl.runtime import kernels
from qdsl.runtime.binary import BinaryDynamicLinear
from qdsl.runtime.fakequant import DynamicFakeQuant
from qdsl.runtime.kernels import binary
from qdsl.runtime.kernels.cpu import capability
from qdsl.runtime.packed import PackedLinear, weight_spec
from qdsl.runtime.registry import module_from_json

HAVE = binary.available()
ISAS = [i for i in (0, 1, 2) if i <= capability().isa]
needs_ext = pytest.mark.skipif(not HAVE, reason=f"1-bit kernel unavailable: {binary.why_not()}")


def act(per_token: bool = True, symmetric: bool = True) -> TensorSpec:
    return TensorSpec(ACTIVATION, 8, symmetric=symmetric,
                      granularity=PerToken() if per_token else PerTensor(), dynamic=True)


shapes = st.tuples(st.integers(1, 6), st.sampled_from([16, 32, 48, 64, 8, 40]),
                   st.integers(1, 37), st.sampled_from([None, 8, 16]))


def _case(m, k, n, gs, seed):
    gs = k if gs is None or k % gs else gs
    g = torch.Generator().manual_seed(seed)
    return binary.random_w1(k, n, gs, g), torch.randn(m, k, generator=g) * 2 + 0.3


@needs_ext
@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(0, 2**16))
def test_w1_kernel_equals_unpack_and_matmul(shape, seed):
    w, x = _case(*shape, seed)
    ref = x.double() @ w.dequant().double().t()
    tol = 1e-5 * float(x.abs().sum(1).max() * w.scale.max()) + 1e-7
    for isa in ISAS:
        y = torch.ops.qdsl_binary.w1_linear(x, w.packed, w.scale, w.group_size, None, isa)
        assert (y.double() - ref).abs().max() <= tol, isa


@needs_ext
@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(0, 2**16), st.booleans(), st.booleans())
def test_w1a8_kernel_equals_the_fake_quant_maths(shape, seed, per_token, symmetric):
    """x quantized in the kernel exactly as qdsl's fake-quant: the same codes, so the
    result is the float64 product of the fake-quantized x to float32 rounding."""
    w, x = _case(*shape, seed)
    xq = binary.fake_quant_a8(x, per_token, symmetric).double()
    ref = xq @ w.dequant().double().t()
    tol = 1e-5 * float(xq.abs().sum(1).max() * w.scale.max()) + 1e-7
    for isa in ISAS:
        y = torch.ops.qdsl_binary.w1a8_linear(x, w.packed, w.scale, w.group_size, None,
                                              per_token, symmetric, isa)
        assert (y.double() - ref).abs().max() <= tol, (isa, per_token, symmetric)


AVX2_ISAS = [i for i in ISAS if i >= 1]
gemm_shapes = st.tuples(st.integers(1, 20), st.sampled_from([32, 64, 96, 256]),
                        st.integers(1, 37), st.sampled_from([None, 32, 64]))


@needs_ext
@pytest.mark.skipif(not AVX2_ISAS, reason="w1a8_gemm is an AVX2 kernel; this CPU has none")
@settings(max_examples=40, deadline=None)
@given(gemm_shapes, st.integers(0, 2**16), st.booleans(), st.booleans())
def test_w1a8_gemm_is_the_row_kernel_bit_for_bit(shape, seed, per_token, bias):
    """The prefill GEMM (bits expanded to +-1 int8) sums the same int8 codes exactly and
    shares the float epilogue: equal to w1a8_linear, not merely close."""
    w, x = _case(*shape, seed)
    b = torch.randn(w.packed.shape[0]) if bias else None
    for isa in AVX2_ISAS:
        ref = torch.ops.qdsl_binary.w1a8_linear(x, w.packed, w.scale, w.group_size, b,
                                                per_token, True, isa)
        y = torch.ops.qdsl_binary.w1a8_gemm(x, w.packed, w.scale, w.group_size, b, per_token,
                                            isa)
        assert torch.equal(y, ref), isa


@needs_ext
@pytest.mark.skipif(not AVX2_ISAS, reason="w1a8_gemm is an AVX2 kernel; this CPU has none")
def test_w1a8_gemm_widens_its_int16_sums_in_time():
    """Every code at +127 under +1 weights over 4,128 inputs (64 int16 steps and then some):
    the sum is 127 * K exactly, where an int16 accumulator kept too long would wrap."""
    k, n = 4128, 3
    w = binary.random_w1(k, n, k)
    w.packed.fill_(255)                                   # every bit 1: +scale
    x = torch.full((2, k), 5.0)                           # per token: every code 127
    y = torch.ops.qdsl_binary.w1a8_gemm(x, w.packed, w.scale, k, None, True, AVX2_ISAS[-1])
    expect = (5.0 / 127) * w.scale[:, 0] * float(127 * k)
    assert torch.allclose(y, expect.expand(2, n), rtol=1e-6)


@needs_ext
def test_w1a8_gemm_candidate_runs_the_row_kernel_where_it_does_not_apply():
    """Asymmetric codes (they do not fit int8) and groups of 16: the row kernel's output."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 64, generator=g)
    for gs, symmetric in ((64, False), (16, True)):
        w = binary.random_w1(64, 7, gs, g)
        assert torch.equal(binary.w1a8_qdsl_gemm(x, w, True, symmetric),
                           binary.w1a8_qdsl(x, w, True, symmetric))


def _module(k=64, n=24, gs=None, per_token=True, symmetric=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    ref = PackedLinear.from_float(w, b, weight_spec(1, gs))
    m = BinaryDynamicLinear.from_spec(ref.weight_spec, torch.where(w >= 0, 1, -1),
                                      ref.weight_scale, b, act_spec=act(per_token, symmetric))
    return m, ref


@pytest.mark.parametrize("per_token,symmetric", [(True, True), (False, True), (True, False)])
def test_binary_dynamic_linear_is_the_packed_linear_after_the_fake_quant(per_token, symmetric):
    m, ref = _module(per_token=per_token, symmetric=symmetric)
    x = torch.randn(2, 5, 64)
    want = ref(DynamicFakeQuant(act(per_token, symmetric))(x))
    torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)
    m.compute_dtype = ref.compute_dtype = "fp32"   # set lower.compute = fp32: the
    exact = ref(DynamicFakeQuant(act(per_token, symmetric))(x))   # fake-quant maths
    assert torch.equal(m(x), exact)


def test_packed_weights_are_one_bit_each_in_memory():
    m, _ = _module(k=256, n=96)
    assert m.weight_packed.dtype == torch.uint8
    assert m.weight_packed.numel() * 8 == 256 * 96                  # 1 bit per weight
    fp32 = 256 * 96 * 4
    held = m.weight_packed.untyped_storage().nbytes() + m.weight_scale.untyped_storage().nbytes()
    assert held == fp32 // 32 + 96 * 4                 # 1/32 of float32 + one scale a row


def test_json_round_trip_is_bit_identical():
    m, _ = _module(gs=16, per_token=False, symmetric=False)
    back = module_from_json(m.to_json(), m.state_dict())
    assert type(back) is BinaryDynamicLinear and back.act_spec == m.act_spec
    x = torch.randn(3, 64)
    assert torch.equal(back(x), m(x))


def test_kernel_table_offers_the_1bit_kernel_only_where_it_built(monkeypatch):
    from qdsl.runtime.kernels.tuning import eligible
    cands = eligible("w1a8", "decode", capability(), True)
    assert ("qdsl_w1a8" in cands) == HAVE and cands[-1] == "float_gemm"


def test_fallback_without_the_extension_runs_the_fake_quant_maths(monkeypatch):
    """No compiler: the table offers only float_gemm, and the result is the same."""
    m, _ = _module()
    x = torch.randn(4, 64)
    y_table = m(x)
    monkeypatch.setattr(kernels, "choose", lambda op, mm, exact=False: "float_gemm")
    torch.testing.assert_close(m(x), y_table, rtol=1e-5, atol=1e-5)


def test_bad_specs_are_refused():
    from qdsl.errors import GraphError
    with pytest.raises(GraphError, match="1-bit"):
        BinaryDynamicLinear(16, 4, weight_spec(4, 16), act_spec=act())
    static = TensorSpec(ACTIVATION, 8, symmetric=True, granularity=PerTensor())
    with pytest.raises(GraphError, match="static"):
        BinaryDynamicLinear(16, 4, weight_spec(1), act_spec=static)
    with pytest.raises(GraphError, match="per_channel|cannot run"):
        BinaryDynamicLinear(16, 4, weight_spec(1), act_spec=TensorSpec(ACTIVATION, 4, symmetric=True, granularity=PerToken(), dynamic=True))


@needs_ext
def test_the_ops_reject_bad_inputs_by_name():
    """Each op names itself and the argument (qdsl_common.h's check_tensor)."""
    w = binary.random_w1(16, 3, 16)
    ops = {"w1_linear": lambda x, p, b: torch.ops.qdsl_binary.w1_linear(x, p, w.scale, 16, b, 0),
           "w1a8_linear": lambda x, p, b: torch.ops.qdsl_binary.w1a8_linear(
               x, p, w.scale, 16, b, True, True, 0)}
    for name, op in ops.items():
        with pytest.raises(RuntimeError, match=f"qdsl_binary.{name}: x must be a contiguous"):
            op(torch.randn(2, 16).double(), w.packed, None)
        with pytest.raises(RuntimeError, match=f"qdsl_binary.{name}: shape mismatch"):
            op(torch.randn(2, 24), w.packed, None)
        with pytest.raises(RuntimeError, match=f"qdsl_binary.{name}: bias shape mismatch"):
            op(torch.randn(2, 16), w.packed, torch.zeros(4))
    with pytest.raises(RuntimeError, match="qdsl_binary.w1a8_linear: shape mismatch"):
        ops["w1a8_linear"](torch.randn(0, 16), w.packed, None)      # no row to quantize
    assert torch.ops.qdsl_binary.w1_linear(torch.randn(0, 16), w.packed, w.scale, 16, None,
                                           0).shape == (0, 3)
