"""w4a8 (qdsl_w4a8.cpp, ``W4DynamicLinear``): 4-bit weights times 8-bit dynamic
activations in integers, against the fake-quant maths on every instruction-set path this
CPU has (K tails, group layouts, thread splits, the per-thread buffers), the fallbacks
(asymmetric codes, group sizes the SIMD layouts do not take, no compiler), the module's
JSON round trip and spec checks. Nothing here is timed (tools/bench_kernels.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qdsl.config.spec import ACTIVATION, PerTensor, PerToken, TensorSpec
from qdsl.errors import GraphError
from qdsl.runtime import kernels
from qdsl.runtime.fakequant import DynamicFakeQuant
from qdsl.runtime.kernels import binary, cext, impls
from qdsl.runtime.packed import PackedLinear, W4DynamicLinear, weight_spec
from qdsl.runtime.registry import module_from_json

EXT = cext.load()
ISAS = list(range(kernels.capability().isa + 1)) if EXT else []
needs_ext = pytest.mark.skipif(not EXT, reason=f"qdsl's C++ kernels unavailable: {cext.why_not()}")


def act(per_token: bool = True, symmetric: bool = True) -> TensorSpec:
    return TensorSpec(ACTIVATION, 8, symmetric=symmetric,
                      granularity=PerToken() if per_token else PerTensor(), dynamic=True)


def reference(x, w4, per_token, symmetric=True):
    """(float64 fake-quant product + bias, the bound on its rounding: |x_hat| @ |w|)."""
    xq = binary.fake_quant_a8(x, per_token, symmetric).double()
    w = w4.dequant().double()
    ref = xq @ w.t() + (0 if w4.bias is None else w4.bias.double())
    return ref, xq.abs() @ w.abs().t()


def close(y, ref, bound):
    return ((y.double() - ref).abs() <= 1e-5 * bound + 1e-6).all()


@needs_ext
@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 9), groups=st.integers(1, 12), gs=st.sampled_from([32, 64, 128, 96, None]),
       n=st.integers(1, 40), per_token=st.booleans(), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_w4a8_kernel_equals_the_fake_quant_maths(m, groups, gs, n, per_token, bias, seed):
    """x quantized in the kernel exactly as the fake-quant, the products summed exactly in
    int32 per group: the float64 fake-quant product to float32 rounding, on every path.
    K = 32 .. 1536: tails of 32 / 64 / 96 columns past a 128-column block; groups of a
    lane block (32, 64), of several blocks (128 on AVX2), one a row (None); 96: a size
    the SIMD layouts do not take (the C++ generic loop; the entry point's fallback)."""
    k = groups * (gs or 32)
    gs = gs or k
    g = torch.Generator().manual_seed(seed)
    w4 = impls.random_w4(k, n, gs, g)
    if bias:
        w4.bias = torch.randn(n, generator=g)
    x = torch.randn(m, k, generator=g) * 2 + 0.3
    ref, bound = reference(x, w4, per_token)
    for isa in ISAS:
        y = torch.ops.qdsl_kernels.w4a8_linear(x, w4.packed, w4.scale, gs, w4.bias, per_token, isa)
        assert close(y, ref, bound), (isa, k, gs)
    assert close(kernels.linear_w4a8(x, w4, per_token, True), ref, bound)
    exact = kernels.linear_w4a8(x, w4, per_token, True, exact=True)   # set lower.compute = fp32
    assert torch.equal(exact, impls.w4a8_float(x, w4, per_token))


@needs_ext
@pytest.mark.parametrize("m", [1, 4, 5, 700])
@pytest.mark.parametrize("gs", [32, 576])
def test_w4a8_thread_split_and_buffers(m, gs):
    """2 threads over N = 203 (chunks not on a multiple of 4, the N % 4 rows), K = 576 (a
    64-column tail on AVX-512), activation-row blocks of 1-4; 700 rows are over the
    1 MiB per-thread buffers and allocated; a second call reuses the buffers."""
    g = torch.Generator().manual_seed(m + gs)
    k, n = 576, 203
    w4 = impls.random_w4(k, n, gs, g)
    w4.bias = torch.randn(n, generator=g)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for per_token in (True, False):
            x = torch.randn(m, k, generator=g)
            ref, bound = reference(x, w4, per_token)
            for isa in ISAS:
                for _ in range(2):
                    y = torch.ops.qdsl_kernels.w4a8_linear(x, w4.packed, w4.scale, gs, w4.bias,
                                                           per_token, isa)
                    assert close(y, ref, bound), (isa, per_token)
    finally:
        torch.set_num_threads(old)


@needs_ext
@pytest.mark.parametrize("m", [1, 3, 700])
def test_w4a8_linear_cat_is_the_separate_calls_side_by_side(m):
    """Several weights on one input (x quantized once, threads over the whole N: chunks
    straddle the weights), with and without bias: the separate calls side by side, to
    float32 rounding (a row summed in a four-row pass or alone adds its lanes in another
    order)."""
    g = torch.Generator().manual_seed(m)
    k = 576
    ws = [impls.random_w4(k, n, 32, g) for n in (64, 13, 203)]
    ws[0].bias, ws[2].bias = torch.randn(64, generator=g), torch.randn(203, generator=g)
    x = torch.randn(m, k, generator=g)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for per_token in (True, False):
            for isa in ISAS:
                sep = torch.cat([torch.ops.qdsl_kernels.w4a8_linear(
                    x, w.packed, w.scale, 32, w.bias, per_token, isa) for w in ws], -1)
                cat = torch.ops.qdsl_kernels.w4a8_linear_cat(
                    x, [w.packed for w in ws], [w.scale for w in ws], 32, [w.bias for w in ws],
                    per_token, isa)
                torch.testing.assert_close(cat, sep, rtol=1e-5, atol=1e-5)
            entry = kernels.linear_w4a8_cat(x, ws, per_token, True)
            torch.testing.assert_close(entry, torch.cat(
                [kernels.linear_w4a8(x, w, per_token, True) for w in ws], -1), rtol=1e-5,
                atol=1e-5)
    finally:
        torch.set_num_threads(old)


@needs_ext
def test_w4a8_extreme_codes_sum_exactly():
    """Every weight code at +7 (u = 15) and every activation code at -127 over 4,096
    columns: the per-row sum is exact (vpmaddubsw's int16 pairs do not saturate)."""
    k, n = 4096, 5
    w4 = impls.random_w4(k, n, k)
    w4.packed.fill_(0xFF)
    x = torch.full((1, k), -3.0)
    for isa in ISAS:
        y = torch.ops.qdsl_kernels.w4a8_linear(x, w4.packed, w4.scale, k, None, True, isa)
        want = (3.0 / 127) * w4.scale[:, 0].double() * float(-127 * 7 * k)
        assert torch.allclose(y[0].double(), want, rtol=1e-6), isa


@needs_ext
def test_w4a8_rejects_bad_inputs_by_name():
    w4 = impls.random_w4(64, 3, 32)
    with pytest.raises(RuntimeError, match="w4a8_linear: shape mismatch"):
        torch.ops.qdsl_kernels.w4a8_linear(torch.randn(2, 64), w4.packed, w4.scale, 64, None,
                                           True, 1)
    with pytest.raises(RuntimeError, match="w4a8_linear: x must be"):
        torch.ops.qdsl_kernels.w4a8_linear(torch.randn(2, 64).double(), w4.packed, w4.scale,
                                           32, None, True, 1)


@pytest.mark.parametrize("per_token", [True, False])
def test_asymmetric_activations_take_the_fake_quantized_input(per_token):
    """Asymmetric codes minus their zero point do not fit int8: linear_w4a8 runs the
    fake-quantized x through the w4 entry, the fake-quant maths to float rounding."""
    g = torch.Generator().manual_seed(1)
    w4 = impls.random_w4(128, 9, 32, g)
    x = torch.randn(3, 128, generator=g) + 1.0
    ref, bound = reference(x, w4, per_token, symmetric=False)
    y = kernels.linear_w4a8(x, w4, per_token, False)
    assert ((y.double() - ref).abs() <= 1e-2 * bound + 1e-5).all()   # the w4 entry may be bf16


def _module(k=64, n=24, gs=32, per_token=True, symmetric=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    ref = PackedLinear.from_float(w, b, weight_spec(4, gs), compute_dtype="fp32")
    m = W4DynamicLinear.from_float(w, b, weight_spec(4, gs), act_spec=act(per_token, symmetric))
    return m, ref


@pytest.mark.parametrize("per_token,symmetric", [(True, True), (False, True), (True, False)])
def test_w4_dynamic_linear_is_the_packed_linear_after_the_fake_quant(per_token, symmetric):
    m, ref = _module(per_token=per_token, symmetric=symmetric)
    x = torch.randn(2, 5, 64)
    want = ref(DynamicFakeQuant(act(per_token, symmetric))(x))
    torch.testing.assert_close(m(x), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())
    m.compute_dtype = "fp32"                          # set lower.compute = fp32: the
    assert torch.equal(m(x), want)                    # fake-quant maths bit for bit


def test_w4_dynamic_linear_json_round_trip_is_bit_identical():
    m, _ = _module(gs=64, per_token=False)
    back = module_from_json(m.to_json(), m.state_dict())
    assert type(back) is W4DynamicLinear and back.act_spec == m.act_spec
    x = torch.randn(3, 64)
    assert torch.equal(back(x), m(x))


def test_w4_dynamic_linear_refuses_other_specs():
    with pytest.raises(GraphError, match="4-bit"):
        W4DynamicLinear(64, 4, weight_spec(1), act_spec=act())
    static = TensorSpec(ACTIVATION, 8, symmetric=True, granularity=PerTensor())
    with pytest.raises(GraphError, match="static"):
        W4DynamicLinear(64, 4, weight_spec(4, 32), act_spec=static)


def test_the_table_offers_the_kernel_only_where_it_built():
    cands = kernels.eligible("w4a8", "decode", kernels.capability(), EXT)
    assert ("qdsl_w4a8" in cands) == EXT and cands[-1] == "float_gemm"
