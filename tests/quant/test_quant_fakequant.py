"""Runtime fake-quant modules (qdsl/runtime/fakequant.py): forward, shapes, state round trip."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load, save
from strategies import activations, matrices

from qdsl.runtime.fakequant import (DynamicFakeQuant, FakeQuant, FloatCast, activation_module,
                                    dequantize_weight, fake_quantize_weight, quantize_weight)
from qdsl.runtime.registry import module_from_json
from qdsl.quant.observers import make_observer
from qdsl.quant.primitives import binarize, choose_qparams, fake_quantize, qrange, reduce_range
from qdsl.config.spec import (ACTIVATION, MSE, WEIGHT, GroupWise, PerChannel, PerGroup, PerTensor,
                              PerToken, TensorPatch, TensorSpec, resolve)

A4_ASYM = TensorSpec(ACTIVATION, 4, symmetric=False)
A8_SYM = TensorSpec(ACTIVATION, 8, symmetric=True)


def _round_trip(m):
    return module_from_json(m.to_json(), load(save(dict(m.state_dict()))))


def test_fake_quant_static_and_round_trip():
    s, z = choose_qparams(torch.tensor(-3.5), torch.tensor(10.2), 4, False)
    fq = FakeQuant.from_spec(A4_ASYM, s, z)
    x = torch.tensor([-9.0, 0.0, 0.4567, 20.0])
    assert torch.allclose(fq(x), torch.tensor([-4, 0, 1, 11]) * s)
    back = _round_trip(fq)
    assert back.perm is None and torch.equal(back(x), fq(x))
    assert back.zero_point.dtype == torch.int32 and back.scale.dtype == torch.float32
    # the one JSON shape of a spec: the module records its TensorSpec as the spec does
    assert fq.to_json() == {"type": "FakeQuant", "spec": A4_ASYM.to_json()}
    assert back.spec == A4_ASYM and (back.bits, back.symmetric) == (4, False)


def test_runtime_modules_refuse_specs_they_do_not_run():
    s, z = torch.tensor(0.1), torch.tensor(0, dtype=torch.int32)
    with pytest.raises(ValueError, match="static quantized spec"):
        FakeQuant.from_spec(resolve(ACTIVATION, TensorPatch(bits=8, dynamic=True)), s, z)
    with pytest.raises(ValueError, match="permutation is missing"):
        FakeQuant.from_spec(resolve(ACTIVATION, TensorPatch(bits=8, granularity=PerGroup(
            2, permute=True))), s, z)
    with pytest.raises(ValueError, match="permutation is unexpected"):
        FakeQuant.from_spec(A8_SYM, s, z, torch.arange(4))
    with pytest.raises(ValueError, match="fp16 / bf16"):
        FloatCast.from_spec(resolve(ACTIVATION, TensorPatch(bits=8)))
    assert activation_module(resolve(ACTIVATION, TensorPatch(bits=32))) is None


@given(activations(d_choices=(4, 8)), st.booleans())
def test_fake_quant_from_peg_observer(x, symmetric):
    spec = resolve(ACTIVATION, TensorPatch(bits=8, symmetric=symmetric,
                                           granularity=PerGroup(2, permute=True)))
    obs = make_observer(spec)
    obs(x)
    fq = activation_module(spec, obs)
    assert isinstance(fq, FakeQuant) and fq.spec == spec
    d = x.shape[-1]
    assert fq.scale.shape == fq.zero_point.shape == fq.perm.shape == (d,)
    assert torch.equal(fq(x), fake_quantize(x, *obs.qparams(), 8, symmetric))
    back = _round_trip(fq)
    assert torch.equal(back.perm, fq.perm) and torch.equal(back(x), fq(x))


def test_fake_quant_gradients_flow():
    fq = FakeQuant.from_spec(A8_SYM, torch.tensor(0.1), torch.tensor(0, dtype=torch.int32))
    x = torch.tensor([0.05, 5.0, -20.0], requires_grad=True)
    fq(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0]  # 5.0 -> q = 50 on the grid; -20 -> -200 clamped


@given(activations(), st.integers(2, 8), st.booleans())
def test_dynamic_per_token(x, bits, symmetric):
    m = DynamicFakeQuant(resolve(ACTIVATION, TensorPatch(bits=bits, symmetric=symmetric,
                                                         granularity=PerToken())))
    y = m(x)
    for row, yr in zip(x.reshape(-1, x.shape[-1]), y.reshape(-1, x.shape[-1])):
        s, z = choose_qparams(row.min(), row.max(), bits, symmetric)
        assert torch.equal(yr, fake_quantize(row, s, z, bits, symmetric))
    assert isinstance(_round_trip(m), DynamicFakeQuant) and torch.equal(_round_trip(m)(x), y)


def test_dynamic_per_tensor_and_binary():
    x = torch.tensor([[-2.0, 0.0, 1.0, 4.0]])
    m = DynamicFakeQuant(resolve(ACTIVATION, TensorPatch(bits=8, dynamic=True)))
    s, z = choose_qparams(torch.tensor(-2.0), torch.tensor(4.0), 8, False)
    assert torch.equal(m(x), fake_quantize(x, s, z, 8, False))
    b = DynamicFakeQuant(resolve(ACTIVATION, TensorPatch(bits=1, symmetric=True, dynamic=True)))
    assert torch.equal(b(x), torch.tensor([[-1.75, 1.75, 1.75, 1.75]]))
    with pytest.raises(ValueError, match="float"):
        DynamicFakeQuant(resolve(ACTIVATION, TensorPatch(bits=32)))


def _cast(dtype: str) -> FloatCast:
    return FloatCast.from_spec(resolve(ACTIVATION, TensorPatch(float_dtype=dtype)))


def test_float_cast():
    x = torch.tensor([1.0 + 2**-10, 1e5])
    assert _cast("bf16")(x).tolist() == [1.0, 99840.0]
    assert _cast("fp16")(x)[0].item() == 1.0 + 2**-10
    assert torch.equal(_round_trip(_cast("fp16"))(x), _cast("fp16")(x))
    assert _round_trip(_cast("bf16")).float_dtype == "bf16"
    with pytest.raises(ValueError, match="float dtype"):
        TensorSpec(ACTIVATION, None, float_dtype="fp8")


@given(matrices(col_multiple=4), st.sampled_from([PerTensor(), PerChannel(), GroupWise(4)]),
       st.sampled_from([2, 4, 8]), st.booleans())
def test_fake_quantize_weight(w, gran, bits, symmetric):
    spec = resolve(WEIGHT, TensorPatch(bits=bits, symmetric=symmetric, granularity=gran))
    w_hat, s, z = fake_quantize_weight(w, spec)
    assert w_hat.shape == w.shape and not w_hat.requires_grad
    lo, hi = reduce_range(w, gran, WEIGHT)
    assert s.shape == lo.shape
    qmin, qmax = qrange(bits, symmetric)
    v = w_hat.reshape(w.shape[0], -1, 4) if isinstance(gran, GroupWise) else w_hat
    levels = v / s + z  # on the integer grid
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    assert (levels.round() >= qmin).all() and (levels.round() <= qmax).all()


@given(matrices(col_multiple=4), st.sampled_from([PerTensor(), PerChannel(), GroupWise(4)]),
       st.sampled_from([1, 2, 4, 8]), st.booleans())
def test_quantize_weight_codes_dequantize_to_the_fake_quantized_weight(w, gran, bits, symmetric):
    """freeze keeps the codes; lower_fake dequantizes them: the same floats, bit for bit."""
    spec = resolve(WEIGHT, TensorPatch(bits=bits, symmetric=symmetric, granularity=gran))
    q, s, z = quantize_weight(w, spec)
    w_hat, s2, z2 = fake_quantize_weight(w, spec)
    assert q.dtype == torch.int32 and q.shape == w.shape
    assert torch.equal(s, s2) and torch.equal(z, z2)
    assert torch.equal(dequantize_weight(q, spec, s, z), w_hat)


def test_fake_quantize_weight_binary_mse_and_float():
    w = torch.randn(6, 16)
    w_hat, s, _ = fake_quantize_weight(w, resolve(WEIGHT, TensorPatch(bits=1)))
    assert torch.allclose(w_hat, binarize(w, PerChannel()))
    w_mse, _, _ = fake_quantize_weight(w, resolve(WEIGHT, TensorPatch(bits=3, observer=MSE())))
    w_mm, _, _ = fake_quantize_weight(w, resolve(WEIGHT, TensorPatch(bits=3)))
    assert ((w_mse - w) ** 2).sum() <= ((w_mm - w) ** 2).sum() * (1 + 1e-5)
    w16, _, _ = fake_quantize_weight(w, resolve(WEIGHT, TensorPatch(float_dtype="fp16")))
    assert torch.equal(w16, w.half().float())
    with pytest.raises(ValueError, match=r"group\(size=5\)"):
        fake_quantize_weight(w, resolve(WEIGHT, TensorPatch(bits=4, granularity=GroupWise(5))))
