"""Runtime fake-quant modules (qdsl/runtime/fakequant.py): forward, shapes, state round trip."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load, save
from strategies import activations, matrices

from qdsl.runtime.fakequant import (DynamicFakeQuant, FakeQuant, FloatCast, dequantize_weight,
                                    fake_quantize_weight, module_from_json, quantize_weight)
from qdsl.quant.observers import make_observer
from qdsl.quant.primitives import binarize, choose_qparams, fake_quantize, qrange, reduce_range
from qdsl.config.spec import (ACTIVATION, MSE, WEIGHT, GroupWise, PerChannel, PerGroup, PerTensor,
                              PerToken, TensorPatch, resolve)


def _round_trip(m):
    return module_from_json(m.to_json(), load(save(dict(m.state_dict()))))


def test_fake_quant_static_and_round_trip():
    s, z = choose_qparams(torch.tensor(-3.5), torch.tensor(10.2), 4, False)
    fq = FakeQuant(s, z, 4, False)
    x = torch.tensor([-9.0, 0.0, 0.4567, 20.0])
    assert torch.allclose(fq(x), torch.tensor([-4, 0, 1, 11]) * s)
    back = _round_trip(fq)
    assert back.perm is None and torch.equal(back(x), fq(x))
    assert back.zero_point.dtype == torch.int32 and back.scale.dtype == torch.float32


@given(activations(d_choices=(4, 8)), st.booleans())
def test_fake_quant_from_peg_observer(x, symmetric):
    spec = resolve(ACTIVATION, TensorPatch(bits=8, symmetric=symmetric,
                                           granularity=PerGroup(2, permute=True)))
    obs = make_observer(spec)
    obs(x)
    fq = FakeQuant.from_observer(obs)
    d = x.shape[-1]
    assert fq.scale.shape == fq.zero_point.shape == fq.perm.shape == (d,)
    assert torch.equal(fq(x), fake_quantize(x, *obs.qparams(), 8, symmetric))
    back = _round_trip(fq)
    assert torch.equal(back.perm, fq.perm) and torch.equal(back(x), fq(x))


def test_fake_quant_gradients_flow():
    fq = FakeQuant(torch.tensor(0.1), torch.tensor(0, dtype=torch.int32), 8, True)
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


def test_float_cast():
    x = torch.tensor([1.0 + 2**-10, 1e5])
    assert FloatCast("bf16")(x).tolist() == [1.0, 99840.0]
    assert FloatCast("fp16")(x)[0].item() == 1.0 + 2**-10
    assert torch.equal(_round_trip(FloatCast("fp16"))(x), FloatCast("fp16")(x))
    with pytest.raises(ValueError, match="float dtype"):
        FloatCast("fp8")


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
