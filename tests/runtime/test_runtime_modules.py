"""Runtime modules against a float reference on random data, state-dict round
trips through safetensors, and meta-device construction + assign loading."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qdsl.quant.primitives import binarize, choose_qparams, fake_quantize, group_view, reduce_range
from qdsl.runtime import (Int8DynamicLinear, Int8Embedding, Int8StaticLinear,
                          Int8WeightOnlyLinear, PackedEmbedding, PackedLinear)
from qdsl.runtime.packed import weight_spec
from qdsl.runtime.registry import module_from_json
from qdsl.config.spec import ACTIVATION, WEIGHT, PerTensor, PerToken, TensorSpec

torch.manual_seed(0)
W, B = torch.randn(48, 64), torch.randn(48)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def modules():
    a_tensor = TensorSpec(ACTIVATION, 8, symmetric=True, granularity=PerTensor(), dynamic=True)
    return {
        "dyn_token": Int8DynamicLinear.from_float(W, B),
        "dyn_tensor": Int8DynamicLinear.from_float(W, B, act_spec=a_tensor),
        "static_asym": Int8StaticLinear.from_float(W, B, 8.0 / 255, 128),
        "weight_only": Int8WeightOnlyLinear.from_float(W, B),
        "w4_group": PackedLinear.from_float(W, B, weight_spec(4, 16)),
        "w2": PackedLinear.from_float(W, B, weight_spec(2)),
        "w1_group": PackedLinear.from_float(W, None, weight_spec(1, 32)),
    }


# module -> relative output error bound vs the float linear, random normal data
TOL = {"dyn_token": 0.02, "dyn_tensor": 0.03, "static_asym": 0.03, "weight_only": 0.02,
       "w4_group": 0.15, "w2": 1.0, "w1_group": 1.0}  # w2 = ternary, min-max: lossy


@pytest.mark.parametrize("name", list(TOL))
@pytest.mark.parametrize("m", [1, 7])
def test_close_to_float(name, m):
    mod = modules()[name]
    x = torch.randn(2, m, 64).clamp(-4, 4)   # static scale 8/255 covers [-4, 4]
    bias = None if name == "w1_group" else B
    y = mod(x)
    assert y.shape == (2, m, 48) and y.dtype == torch.float32
    assert rel(y, torch.nn.functional.linear(x, W, bias)) < TOL[name]


def test_w1_is_xtc_sign_times_mean_abs():
    mod = modules()["w1_group"]
    x = torch.randn(3, 64)
    ref = torch.nn.functional.linear(x, binarize(W, weight_spec(1, 32).granularity))
    assert torch.allclose(mod(x), ref, atol=1e-4)


@pytest.mark.parametrize("bits,size", [(4, 16), (4, None), (2, None), (2, 32)])
def test_packed_matches_fake_quant(bits, size):
    spec = weight_spec(bits, size)
    lo, hi = reduce_range(W, spec.granularity, WEIGHT)   # [48, G, 1] or [48, 1]
    scale, zp = choose_qparams(lo, hi, bits, True)
    w_hat = fake_quantize(group_view(W, size) if size else W, scale, zp, bits, True)
    x = torch.randn(3, 64)
    ref = torch.nn.functional.linear(x, w_hat.reshape(48, 64), B)
    assert torch.allclose(PackedLinear.from_float(W, B, spec)(x), ref, atol=1e-4)


@pytest.mark.parametrize("size", [32, 64])
def test_w4_int4_kernel_is_close_to_the_exact_path(size):
    """w4 group 32..256 runs torch's int4 kernel in bf16; fp32 compute is the exact path."""
    torch.manual_seed(0)
    w, b = torch.randn(96, 128) * 0.05, torch.randn(96)
    fast = PackedLinear.from_float(w, b, weight_spec(4, size))
    exact = PackedLinear.from_float(w, b, weight_spec(4, size))
    exact.compute_dtype = "fp32"
    assert fast.uses_int4_kernel() and not exact.uses_int4_kernel()
    x = torch.randn(2, 5, 128)
    y, ref = fast(x), exact(x)
    assert y.shape == ref.shape == (2, 5, 96) and y.dtype == torch.float32
    assert (y - ref).norm() / ref.norm() < 5e-3                  # bf16 rounding
    assert fast.to_json()["compute_dtype"] == "bf16"
    assert not PackedLinear.from_float(w, b, weight_spec(4, 16)).uses_int4_kernel()
    assert not PackedLinear.from_float(w, b, weight_spec(2, 32)).uses_int4_kernel()


def test_int8_dynamic_decode_and_prefill_kernels_agree():
    # M = 1 may run fbgemm (asym u8 activation) and M > 1 _int_mm (sym per token)
    mod, x = modules()["dyn_token"], torch.randn(5, 64)
    one_by_one = torch.cat([mod(x[i:i + 1]) for i in range(5)])
    assert rel(one_by_one, mod(x)) < 0.02


def test_int8_exact_integer_matmul():
    # weights and activations already on the grid: the int8 GEMM is exact
    w = torch.randint(-127, 128, (16, 32)).float()
    w[:, 0] = 127                                # per-row scale exactly 1
    x = torch.randint(-127, 128, (4, 32)).float()
    x[:, 0] = 127                                # per-token scale exactly 1
    assert torch.equal(Int8DynamicLinear.from_float(w)(x), x @ w.t())


def test_embeddings_dequantize_looked_up_rows():
    table = torch.randn(100, 64)
    ids = torch.tensor([[3, 99, 3], [0, 1, 2]])
    for emb, tol in ((Int8Embedding.from_float(table), 0.01),
                     (PackedEmbedding.from_float(table, weight_spec(4, 16)), 0.12)):
        out = emb(ids)
        assert out.shape == (2, 3, 64)
        assert rel(out, table[ids]) < tol


@pytest.mark.parametrize("name", list(TOL))
def test_safetensors_round_trip_and_meta_assign(name, tmp_path):
    mod = modules()[name]
    """The module's JSON (its specs, as TensorSpec.to_json) and its state dict are all it
    is: rebuilt on meta from the JSON alone, assigned the saved tensors, it computes the
    same; the JSON survives a JSON round trip (a dyn_tensor module stays per tensor)."""
    save_file(mod.state_dict(), str(tmp_path / "m.safetensors"))
    config = json.loads(json.dumps(mod.to_json()))
    fresh = type(mod).from_json(config)
    assert all(t.is_meta for t in fresh.state_dict().values())
    fresh.load_state_dict(load_file(str(tmp_path / "m.safetensors")), assign=True)
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), mod(x))
    assert fresh.to_json() == mod.to_json() == config
    assert TensorSpec.from_json(config["weight"]) == mod.weight_spec
    if "act" in config:
        assert TensorSpec.from_json(config["act"]) == mod.act_spec
    again = module_from_json(config, load_file(str(tmp_path / "m.safetensors")))
    assert type(again) is type(mod) and torch.equal(again(x), mod(x))


@pytest.mark.parametrize("make", [lambda t: Int8Embedding.from_float(t),
                                  lambda t: PackedEmbedding.from_float(t, weight_spec(4, 16)),
                                  lambda t: PackedEmbedding.from_float(t, weight_spec(1))],
                         ids=["int8", "w4_group", "w1"])
def test_embedding_json_round_trip_and_meta_assign(make, tmp_path):
    """An embedding's JSON is its shapes and weight spec: rebuilt on meta from it alone
    (directly and through the registry), assigned the saved tensors, it looks up the same."""
    emb = make(torch.randn(100, 64))
    save_file(emb.state_dict(), str(tmp_path / "e.safetensors"))
    config = json.loads(json.dumps(emb.to_json()))
    assert config == {"type": type(emb).__name__, "num_embeddings": 100, "embedding_dim": 64,
                      "weight": emb.weight_spec.to_json()} == emb.config()
    ids = torch.tensor([[3, 99, 3], [0, 1, 2]])
    for fresh in (type(emb).from_json(config), module_from_json(config)):
        assert type(fresh) is type(emb) and fresh.weight_spec == emb.weight_spec
        assert all(t.is_meta for t in fresh.state_dict().values())
        fresh.load_state_dict(load_file(str(tmp_path / "e.safetensors")), assign=True)
        assert torch.equal(fresh(ids), emb(ids)) and fresh.to_json() == config


def test_dyn_tensor_keeps_its_granularity_through_json():
    mod = modules()["dyn_tensor"]
    assert mod.to_json()["act"]["granularity"] == {"name": "per_tensor"}
    assert mod.act_spec.granularity == PerTensor() and not hasattr(mod, "_act_g")
    fresh = Int8DynamicLinear.from_json(mod.to_json())
    assert fresh.act_spec == mod.act_spec


def test_modules_are_built_from_specs_they_can_run():
    from qdsl.errors import GraphError
    q, scale = torch.zeros(48, 64, dtype=torch.int32), torch.ones(48, 1)
    m = Int8WeightOnlyLinear.from_spec(weight_spec(8), q, scale, B)
    assert m.weight_spec == weight_spec(8) and m.weight.dtype == torch.int8
    w4 = PackedLinear.from_spec(weight_spec(4, 16), q, torch.ones(48, 4))
    assert (w4.bits, w4.group_size) == (4, 16) and w4.weight_packed.shape == (48, 32)
    with pytest.raises(GraphError, match="w4"):
        Int8WeightOnlyLinear.from_spec(weight_spec(4), q, scale)
    with pytest.raises(GraphError, match="w8"):
        PackedLinear.from_spec(weight_spec(8), q, scale)
    with pytest.raises(GraphError, match="static"):
        Int8DynamicLinear.from_spec(weight_spec(8), q, scale,
                                    act_spec=TensorSpec(ACTIVATION, 8, granularity=PerTensor()))
    with pytest.raises(GraphError, match="groups of 24"):
        PackedLinear.from_spec(weight_spec(4, 24), q, torch.ones(48, 3))


def test_storage_is_really_small():
    w4 = modules()["w4_group"]
    assert w4.weight_packed.dtype == torch.uint8 and w4.weight_packed.shape == (48, 32)
    assert modules()["w1_group"].weight_packed.shape == (48, 8)
    assert modules()["dyn_token"].weight.dtype == torch.int8


def test_unsupported_spec_is_a_graph_error():
    from qdsl.errors import GraphError
    with pytest.raises(GraphError, match="w4"):
        Int8DynamicLinear.from_float(W, B, weight_spec=weight_spec(4))
    with pytest.raises(GraphError):
        Int8DynamicLinear.from_float(W, B, act_spec=TensorSpec(ACTIVATION, 4, symmetric=False,
                                                               granularity=PerToken()))


def test_int8_dynamic_asymmetric_activations():
    # asymmetric per-token codes, shifted by -128, corrected by the weight row sums
    m = Int8DynamicLinear.from_float(W, B, act_spec=TensorSpec(ACTIVATION, 8, symmetric=False,
                                                               granularity=PerToken()))
    x = torch.randn(5, W.shape[1]) + 3.0                     # all-positive-ish: asym helps
    assert rel(m(x), torch.nn.functional.linear(x, W, B)) < 2e-2
