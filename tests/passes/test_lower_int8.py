"""lower_int8 on tiny models: each registered handler, agreement with fake-quant, int8
artifacts (round trip bit-identical, meta-device load), fallback, explain's exec column.

Tolerance: lowered vs fake-quant logits from the same frozen parameters differ by
float summation order, the bf16 GEMM of weight-only linears (~3e-3 relative) and
fbgemm's asymmetric grid for one-token dynamic linears; on these tiny random
models |diff| <= 2% of the largest logit, and top-1 agrees on >= 90% of positions
(random tiny models have near-tied logits; SmolLM2 / GPT-2 124M figures are in
docs/performance.md).
"""

import warnings

import pytest
import torch
from tiny import tiny, tiny_ids

import qdsl.compiler as C
from qdsl.errors import ArtifactError, GraphError
from qdsl.passes.lower_fake import lower_fake
from qdsl.quant.primitives import quantize
from qdsl.runtime import (Int8DynamicLinear, Int8Embedding, Int8StaticLinear,
                          Int8WeightOnlyLinear, PackedEmbedding, PackedLinear)

CACHE = 32
W8A8 = """
*                    -> w8 sym per_channel
block.*.ln_1         -> a8 asym per_tensor dynamic
block.*.attn.context -> a8 sym per_token dynamic
block.*.ln_2         -> a8 per_tensor static
op:gelu?             -> a8 sym per_tensor static
block.*.mlp.mul?     -> a8 sym per_token dynamic
"""
W4 = "* -> w4 sym group(size=16)"
W8_BF16_IN = "* -> w8 sym per_tensor\nblock.*.ln_1 -> a16"  # 16-bit and float inputs


def _compile(family, recipe, lower="int8", **kw):
    m = tiny(family)
    q = C.compile(m, recipe, calib=tiny_ids(m, 2, 16), lower=lower, max_cache_len=CACHE,
                  progress=False, **kw)
    return m, q


@pytest.fixture(scope="module")
def gpt2_w8a8():
    return _compile("gpt2", W8A8)


@pytest.fixture(scope="module")
def llama_w8a8():
    return _compile("llama", W8A8)


def modules(q):
    """canonical name -> runtime module type name, for every call_module of the graph."""
    return {n.meta.get("qdsl"): type(q.gm.get_submodule(n.target)).__name__
            for n in q.gm.graph.nodes if n.op == "call_module" and "qdsl_int8__" in n.target}


def float_weights(q):
    """Float tensors of 2+ dims the lowered graph reads, besides the key/value cache."""
    from qdsl.artifact.store import lowered_state
    stored, _, _ = lowered_state(q.gm)
    return [k for k, t in stored.items()
            if t.is_floating_point() and t.dim() >= 2 and not k.endswith("_scale")]


def fake_of(model, q):
    """The fake-quant graph built from q's frozen parameters."""
    from qdsl.graph.capture import capture
    gm = capture(model, mode="generate", max_cache_len=CACHE).gm
    return lower_fake(gm, q.named, q.plan, q.frozen)


def assert_agrees(model, q, top1=0.9):
    ids = tiny_ids(model, 2, 12, seed=7)
    from qdsl.runtime.graphlm import GraphLM
    a, b = q(ids), GraphLM(fake_of(model, q), CACHE).logits(ids)
    assert (a - b).abs().max() <= 0.02 * b.abs().max(), (a - b).abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= top1


def test_rows_gpt2_conv1d(gpt2_w8a8):
    model, q = gpt2_w8a8
    got = modules(q)
    assert got["embed"] == "Int8Embedding" and got["embed.pos"] == "Int8Embedding"
    assert got["block.0.attn.qkv"] == "Int8DynamicLinear"        # Conv1D addmm, asym dynamic
    assert got["block.0.attn.out"] == "Int8DynamicLinear"        # per-token dynamic
    assert got["block.0.mlp.c_fc"] == "Int8StaticLinear"         # ln_2 static asym
    assert got["block.0.mlp.c_proj"] == "Int8StaticLinear"       # gelu static sym
    assert got["lm_head"] == "Int8WeightOnlyLinear"              # ln_f float
    ops = {str(n.target) for n in q.gm.graph.nodes if n.op == "call_function"}
    assert "aten.addmm.default" not in ops and "aten.linear.default" not in ops
    assert float_weights(q) == []                                # no float weight left
    assert q.fallbacks == []


def test_tied_embedding_shares_codes(gpt2_w8a8):
    _, q = gpt2_w8a8
    emb, head = q.gm.qdsl_int8__embed, q.gm.qdsl_int8__lm_head
    assert emb.weight is head.weight and emb.weight.dtype == torch.int8


def test_codes_equal_quantized_original(gpt2_w8a8):
    model, q = gpt2_w8a8
    w = model.transformer.h[0].mlp.c_fc.weight.t()               # Conv1D [in, out] -> [out, in]
    scale, zp = q.frozen.weights["block.0.mlp.c_fc"]
    codes = q.gm.qdsl_int8__block_0_mlp_c_fc.weight.int()
    assert torch.equal(codes, quantize(w, scale, zp, 8, True))


def test_rows_llama(llama_w8a8):
    model, q = llama_w8a8
    got = modules(q)
    assert got["block.0.attn.q"] == "Int8DynamicLinear"
    assert got["block.0.mlp.gate"] == "Int8StaticLinear"
    assert got["block.0.mlp.down"] == "Int8DynamicLinear"        # reads mlp.mul's codes
    assert float_weights(q) == []


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_agrees_with_fake_quant(family, gpt2_w8a8, llama_w8a8):
    model, q = gpt2_w8a8 if family == "gpt2" else llama_w8a8
    assert_agrees(model, q)


def test_packed_rows_and_weight_only_with_16_bit_input():
    model, q = _compile("llama", W4)
    got = modules(q)
    assert got["embed"] == "PackedEmbedding" and got["block.0.mlp.up"] == "PackedLinear"
    assert float_weights(q) == []
    assert_agrees(model, q, top1=1.0)                            # exact maths, fp32 GEMM
    model, q = _compile("gpt2", W8_BF16_IN)
    assert modules(q)["block.0.attn.qkv"] == "Int8WeightOnlyLinear"
    assert modules(q)["lm_head"] == "Int8WeightOnlyLinear"
    assert_agrees(model, q)


W4A8 = """
*                    -> w4 sym group(size=32)
block.*.ln_1         -> a8 sym per_token dynamic
block.*.attn.context -> a8 sym per_tensor dynamic
block.*.ln_2         -> a8 asym per_token dynamic
op:gelu?             -> a8 sym per_token dynamic
block.*.mlp.mul?     -> a8 sym per_token dynamic
"""


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_w4a8_rows_agree_with_fake_quant_and_round_trip(family, tmp_path):
    """4-bit weights whose input is 8-bit dynamic lower to W4DynamicLinear (symmetric
    inputs: the int4 x int8 kernel; asymmetric ones: the fake-quantized input through the
    w4 kernel), a float input to PackedLinear; they agree with fake-quant and an artifact
    loads bit-identical."""
    model, q = _compile(family, W4A8)
    got = modules(q)
    first = "block.0.attn.qkv" if family == "gpt2" else "block.0.attn.q"
    mlp_in = "block.0.mlp.c_fc" if family == "gpt2" else "block.0.mlp.gate"
    mlp_out = "block.0.mlp.c_proj" if family == "gpt2" else "block.0.mlp.down"
    for name in (first, "block.0.attn.out", mlp_in, mlp_out):
        assert got[name] == "W4DynamicLinear", name
    assert got["lm_head"] == "PackedLinear"                     # ln_f stays float
    assert float_weights(q) == []
    assert q.fallbacks == []
    assert_agrees(model, q)
    loaded = C.load(q.save(tmp_path / "w4a8"))
    ids = tiny_ids(model, 1, 9)
    assert torch.equal(loaded(ids), q(ids))


def _runtime(q, cls):
    return [m for m in q.gm.modules() if type(m).__name__ == cls]


def test_lower_compute_setting_picks_fast_or_exact_kernels(tmp_path):
    """w4 group 32 runs the bf16 int4 kernel by default; `set lower.compute = fp32` makes
    weight-only modules exact (fp32), and the artifact keeps the choice."""
    recipe = "* -> w4 sym group(size=32)\nlm_head -> w8 sym per_channel"
    model, fast = _compile("llama", recipe)
    assert all(m.uses_int4_kernel() for m in _runtime(fast, "PackedLinear"))
    assert_agrees(model, fast)
    model, exact = _compile("llama", "set lower.compute = fp32\n" + recipe)
    packed = _runtime(exact, "PackedLinear")
    assert packed and not any(m.uses_int4_kernel() for m in packed)
    assert {m.compute_dtype for m in _runtime(exact, "Int8WeightOnlyLinear")} == {"fp32"}
    assert_agrees(model, exact, top1=1.0)
    loaded = C.load(exact.save(tmp_path / "a"))
    assert {m.compute_dtype for m in _runtime(loaded, "PackedLinear")} == {"fp32"}
    ids = tiny_ids(model, 1, 8)
    assert torch.equal(loaded(ids), exact(ids))


@pytest.mark.parametrize("recipe, reason, simulate", [
    ("* -> w3", "3-bit", True), ("* -> w8 asym", "asymmetric", False),
    ("* -> w8\nblock.*.ln_1 -> a4 dynamic", "4 bits", False),
    ("* -> w8\nblock.*.ln_1 -> a8 per_group(K=2)", "no integer kernel", True)])
def test_fallback_error_or_simulate(recipe, reason, simulate):
    with pytest.raises(GraphError, match=reason):
        _compile("gpt2", recipe)
    if not simulate:
        return
    with pytest.warns(UserWarning, match="stays simulated"):
        model, q = _compile("gpt2", recipe, fallback="simulate")
    assert q.fallbacks and reason in q.fallbacks[0]["reason"]
    assert_agrees(model, q)


def test_artifact_round_trip_bit_identical(gpt2_w8a8, tmp_path):
    model, q = gpt2_w8a8
    out = q.save(tmp_path / "a")
    from safetensors.torch import load_file
    stored = load_file(str(out / "model.safetensors"))
    assert stored["qdsl_int8__block_0_mlp_c_fc.weight"].dtype == torch.int8
    assert not any("cache" in k for k in stored)                 # run-time state not stored
    loaded = C.load(out)                                         # no source model needed
    ids = tiny_ids(model, 2, 10, seed=3)
    assert torch.equal(loaded(ids), q(ids))
    lm_a, lm_b = loaded.lm(), q.lm()
    assert lm_a.greedy(ids[:1], 4) == lm_b.greedy(ids[:1], 4)    # decode path too
    assert loaded.gm.qdsl_int8__embed.weight is loaded.gm.qdsl_int8__lm_head.weight
    again = C.load(loaded.save(tmp_path / "b"))                  # a loaded model saves too
    assert torch.equal(again(ids), q(ids))
    with pytest.raises(ArtifactError, match="compiled from"):
        C.load(out, tiny("gpt2", seed=5))


def test_packed_artifact_round_trip(tmp_path):
    model, q = _compile("llama", W4)
    loaded = C.load(q.save(tmp_path / "w4"))
    ids = tiny_ids(model, 1, 9)
    assert torch.equal(loaded(ids), q(ids))


def test_meta_load_builds_on_meta(gpt2_w8a8, tmp_path, monkeypatch):
    """Loading never materialises float weights: lower_int8 sees only meta tensors."""
    import qdsl.passes.int8_handlers as L
    _, q = gpt2_w8a8
    out = q.save(tmp_path / "m")
    seen = []
    real = L._codes

    def spy(gm, s, frozen):
        codes = real(gm, s, frozen)
        seen.append(codes[0].is_meta)
        return codes

    monkeypatch.setattr(L, "_codes", spy)
    C.load(out)
    assert seen and all(seen)


def test_explain_exec_column():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = C.explain(W8A8, tiny("gpt2"), lower="int8").rows()
    ex = {r["name"]: r["exec"] for r in rows}
    assert ex["block.0.attn.qkv"] == "int8 gemm (dynamic)"
    assert ex["block.0.mlp.c_fc"] == "int8 gemm (static)"
    assert ex["lm_head"] == "int8 weight-only" and ex["embed"] == "int8 rows"
    assert ex["block.0.ln_1"] == "int8 (gemm input)"
    assert ex["block.0.res_sum"] == "float"
    rows = C.explain("* -> w3\nblock.*.res_sum -> a8", tiny("gpt2"), lower="int8").rows()
    ex = {r["name"]: r["exec"] for r in rows}
    assert ex["block.0.mlp.c_fc"] == "simulated (fake-quant)"
    assert ex["block.0.res_sum"] == "simulated (fake-quant)"


def test_int8_weights_are_contiguous_for_conv1d_models(gpt2_w8a8):
    """GPT-2's Conv1D weights are [in, out]: their codes come transposed; the runtime
    module stores them row-major, as a loaded artifact has them (the C++ kernels would
    otherwise copy the weight on every call)."""
    _, q = gpt2_w8a8
    mods = [m for m in q.gm.modules() if isinstance(m, (Int8DynamicLinear, Int8StaticLinear))]
    assert mods and all(m.weight.is_contiguous() for m in mods)
