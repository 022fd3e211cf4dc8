"""Hadamard rotation (`rotate`): the matrices, the float model unchanged, the online
Hadamard before the down-projection, located errors, int8 lowering and artifacts."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st
from tiny import tiny, tiny_ids

import qdsl.compiler as C
from qdsl.errors import GraphError
from qdsl.quant.hadamard import apply_hadamard, hadamard, hadamard_factors
from qdsl.runtime import Int8StaticLinear
from qdsl.runtime.hadamard import OnlineHadamard

W8A8 = "* -> w8 sym per_channel\ntype:Linear.input -> a8 sym per_tensor static\n"


@pytest.mark.parametrize("n, factors", [(64, (1, 64)), (576, (36, 16)), (1536, (12, 128)),
                                        (896, (28, 32)), (4864, (76, 64)), (768, (12, 64)),
                                        (9, None), (100, None)])
def test_hadamard_orders_of_the_models_sizes(n, factors):
    assert hadamard_factors(n) == factors
    if factors is None:
        with pytest.raises(ValueError, match=f"no Hadamard matrix of order {n}"):
            hadamard(n)
        return
    h = hadamard(n)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=h.dtype), atol=1e-12)
    assert torch.allclose((h * n ** 0.5).abs(), torch.ones(n, n, dtype=h.dtype))  # +-1


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([1, 2, 8, 12, 20, 28, 36, 48, 96, 576, 1536, 12 * 2 ** 9, 2 ** 12]),
       st.integers(1, 5),
       st.integers(0, 2 ** 16))
def test_fast_transform_equals_the_dense_product(n, rows, seed):
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert torch.allclose(apply_hadamard(x, n), x @ hadamard(n), atol=1e-10)
    assert torch.allclose(OnlineHadamard(n)(x.float()), (x @ hadamard(n)).float(), atol=1e-5)


def test_online_hadamard_factors_cached_under_inference_mode_serve_autograd():
    """The factors are cached per process; the first call may come from an evaluation
    under inference_mode, a later one from a pass that takes gradients (the search's
    Fisher scores): the cached factor must not be an inference tensor."""
    n = 3 * 2 ** 8 + 2 ** 8          # 1024: one Sylvester factor of 128 and one of 8
    with torch.inference_mode():
        OnlineHadamard(n)(torch.randn(2, n))
    x = torch.randn(2, n, requires_grad=True)
    OnlineHadamard(n)(x).square().sum().backward()
    assert torch.allclose(x.grad, 2 * x.detach(), atol=1e-5)     # H orthonormal


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True},
                                       {"hidden_size": 48, "intermediate_size": 96}])
def test_rotation_leaves_the_float_logits_unchanged(overrides):
    model = tiny("llama", **overrides)
    ids = tiny_ids(model, 2, 12, seed=7)
    with torch.no_grad():
        ref = model(ids).logits
    q = C.compile(model, "rotate\n", calib=tiny_ids(model, 2, 16), lower="fake",
                  max_cache_len=32, progress=False)
    out = q(ids)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)   # the source model is not written
    had = [n for n in q.gm.graph.nodes if n.op == "call_module" and "hadamard" in n.target]
    assert len(had) == model.config.num_hidden_layers
    assert q.named["block.0.mlp.mul"].node == had[0].name   # the down input is rotated


def test_gpt2_layernorm_is_a_located_error():
    with pytest.raises(GraphError) as e:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            C.explain("rotate\n", tiny("gpt2"))
    assert e.value.node == "block.0.ln_1"
    assert str(e.value).startswith("rotate (<string>:1:1): block.0.ln_1 is a layer_norm; "
                                   "rotating the residual stream needs RMSNorm")


def test_an_unknown_hadamard_order_is_a_located_error():
    with pytest.raises(GraphError) as e:
        C.explain("rotate\n", tiny("llama", intermediate_size=100))
    assert e.value.node == "block.0.mlp.down"
    assert "no Hadamard matrix of order 100 (the input size of block.0.mlp.down)" in str(e.value)


def test_int8_lowering_takes_the_rotated_input_quantizers_and_artifacts_replay(tmp_path):
    model = tiny("llama", tie_word_embeddings=True)
    recipe = W8A8 + "rotate\n"
    q = C.compile(model, recipe, calib=tiny_ids(model, 4, 16), lower="int8", max_cache_len=32,
                  progress=False)
    kinds = {n.meta.get("qdsl"): type(q.gm.get_submodule(n.target))
             for n in q.gm.graph.nodes if n.op == "call_module" and "qdsl_int8__" in n.target}
    assert kinds["block.0.mlp.down"] is Int8StaticLinear and kinds["lm_head"] is Int8StaticLinear
    # the order on the down input: mul -> online Hadamard -> int8 GEMM (quantizer absorbed)
    down = next(n for n in q.gm.graph.nodes if n.meta.get("qdsl") == "block.0.mlp.down"
                and n.op == "call_module")
    assert "hadamard" in str(down.args[0].target)
    ids = tiny_ids(model, 2, 12, seed=7)
    a = q(ids)
    q.save(tmp_path / "int8")
    assert torch.equal(C.load(tmp_path / "int8")(ids), a)
    # no float copy of the table is stored (embedding and lm_head are int8): not the
    # unrotated tied table export reads under its second name, which nothing reads
    from safetensors import safe_open
    with safe_open(tmp_path / "int8" / "model.safetensors", "pt") as f:
        tables = [k for k in f.keys() if f.get_slice(k).get_dtype() == "F32" and
                  f.get_slice(k).get_shape() == [model.config.vocab_size,
                                                 model.config.hidden_size]]
    assert tables == [], tables
    fake = C.compile(model, recipe, calib=tiny_ids(model, 4, 16), lower="fake",
                     max_cache_len=32, progress=False)
    fake.save(tmp_path / "fake")
    assert torch.equal(C.load(tmp_path / "fake", model)(ids), fake(ids))
    b = fake(ids)
    assert (a - b).abs().max() <= 0.02 * b.abs().max()


def test_a_16_bit_down_input_in_a_rotated_w8a8_recipe_lowers_to_weight_only_int8():
    """rotate_w8a8_static_down16.qrec's shape: one block's down input at fp16 (after the
    online Hadamard), the others int8; --lower int8 agrees with fake-quant."""
    model = tiny("llama")
    recipe = W8A8 + "rotate\nblock.[1].mlp.down.input -> a.fp16\n"
    calib = tiny_ids(model, 4, 16)
    q = C.compile(model, recipe, calib=calib, lower="int8", max_cache_len=32, progress=False)
    downs = {n.meta.get("qdsl"): n for n in q.gm.graph.nodes
             if n.op == "call_module" and str(n.meta.get("qdsl", "")).endswith("mlp.down")}
    kinds = {k: type(q.gm.get_submodule(n.target)).__name__ for k, n in downs.items()}
    assert kinds == {"block.0.mlp.down": "Int8StaticLinear",
                     "block.1.mlp.down": "Int8WeightOnlyLinear"}
    cast = downs["block.1.mlp.down"].args[0]          # the fp16 cast, after the Hadamard
    assert "hadamard" in str(cast.args[0].target)
    fake = C.compile(model, recipe, calib=calib, lower="fake", max_cache_len=32, progress=False)
    ids = tiny_ids(model, 2, 12, seed=7)
    a, b = q(ids), fake(ids)
    assert (a - b).abs().max() <= 0.02 * b.abs().max()
