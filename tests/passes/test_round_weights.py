"""GPTQ / AWQ through the pipeline on tiny models (qdsl/passes/round_weights.py):
calibration recorders in and out of the graph, the codes freeze stores, int8 /
packed lowering against fake-quant, artifact round trips, errors before data.

Tolerance of lowered vs fake-quant: as in test_lower_int8 (same frozen codes; float
summation order and bf16 GEMMs of weight-only linears): |diff| <= 2% of the largest
logit. Artifact round trips are bit-identical.
"""

import pytest
import torch
from tiny import tiny, tiny_ids

import qdsl.compiler as C
from qdsl.errors import GraphError, PlanError
from qdsl.models.calib import CalibrationError
from qdsl.passes.lower_fake import INSCALE_PREFIX, lower_fake
from qdsl.passes.round_weights import STATS_PREFIX
from qdsl.quant.weights import rtn_codes

CACHE = 32
EMB = "embed -> rtn\nembed.pos? -> rtn\n"
GPTQ_W4 = "* -> w4 group(16) gptq(act_order, block=8)\n" + EMB
AWQ_W4 = "* -> w4 group(16) awq(grid=8, clip)\n" + EMB


def _compile(family, recipe, lower="int8", **kw):
    m = tiny(family)
    q = C.compile(m, recipe, calib=tiny_ids(m, 4, 16), lower=lower, max_cache_len=CACHE,
                  progress=False, **kw)
    return m, q


def _modules(q, prefix):
    return [n.target for n in q.gm.graph.nodes if n.op == "call_module" and n.target.startswith(prefix)]


def _fake_of(model, q):
    from qdsl.graph.capture import capture
    gm = capture(model, mode="generate", max_cache_len=CACHE).gm
    return lower_fake(gm, q.named, q.plan, q.frozen)


def _assert_agrees(model, q):
    from qdsl.runtime.graphlm import GraphLM
    ids = tiny_ids(model, 2, 12, seed=7)
    a, b = q(ids), GraphLM(_fake_of(model, q), CACHE).logits(ids)
    assert (a - b).abs().max() <= 0.02 * b.abs().max(), (a - b).abs().max()


@pytest.mark.parametrize("family,recipe", [("llama", GPTQ_W4), ("gpt2", AWQ_W4),
                                           ("gpt2", "* -> w8 per_channel gptq\n" + EMB)])
def test_compiled_codes_are_gptq_or_awq_and_int8_agrees_with_fake_quant(family, recipe):
    model, q = _compile(family, recipe, check=True)
    assert _modules(q, STATS_PREFIX) == []                        # recorders gone
    spec = q.plan["block.0.mlp.up" if family == "llama" else "block.0.mlp.c_fc"].weight
    name = "block.0.mlp.up" if family == "llama" else "block.0.mlp.c_fc"
    node = next(n for n in q.named.nodes if n.name == name)
    w = model.get_submodule(node.module).weight
    w = w.t() if node.weight_layout == "in_out" else w
    rq, _, _ = rtn_codes(w, spec)
    assert name in q.frozen.kept and not torch.equal(q.frozen.codes[name], rq)  # not RTN
    assert (len(_modules(q, INSCALE_PREFIX)) > 0) == ("awq" in recipe)
    kinds = {type(m).__name__ for m in q.gm.modules()}
    assert ("PackedLinear" if "w4" in recipe else "Int8WeightOnlyLinear") in kinds
    _assert_agrees(model, q)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [GPTQ_W4, AWQ_W4])
@pytest.mark.parametrize("lower", ["fake", "int8"])
def test_artifact_round_trip_is_bit_identical(recipe, lower, tmp_path):
    model, q = _compile("llama", recipe, lower=lower)
    ids = tiny_ids(model, 2, 10, seed=3)
    loaded = C.load(q.save(tmp_path / "a"), model)   # fake: re-captures the source model
    assert torch.equal(loaded(ids), q(ids))
    if lower == "fake":  # the stored codes, not the source weight rounded to nearest
        from safetensors.torch import load_file
        stored = load_file(str(tmp_path / "a" / "quant_params.safetensors"))
        assert stored["weight.block.0.attn.q.codes"].dtype == torch.int8
        assert ("weight.block.0.attn.q.in_scale" in stored) == ("awq" in recipe)


@pytest.mark.slow
def test_gptq_lowers_the_model_error_against_rtn_on_its_calibration_data():
    """On a tiny llama whose inputs are its own calibration windows, GPTQ's logits are
    closer to the float model's than round-to-nearest's (2 bits make it visible)."""
    m = tiny("llama")
    calib = tiny_ids(m, 8, 16, seed=11)
    with torch.no_grad():
        ref = m(calib).logits
    errs = {}
    for name, rule in (("rtn", "* -> w2 asym group(16)"), ("gptq", "* -> w2 asym group(16) gptq")):
        q = C.compile(m, rule + "\n" + EMB, calib=calib, lower="fake", max_cache_len=CACHE,
                      progress=False)
        errs[name] = float((q(calib) - ref).square().mean())
    assert errs["gptq"] < errs["rtn"], errs


def test_rounding_needs_calibration_data():
    m = tiny("llama")
    with pytest.raises(CalibrationError, match="rounds .* weights with GPTQ / AWQ"):
        C.compile(m, GPTQ_W4, max_cache_len=CACHE, progress=False)


def test_errors_before_data_name_the_node_and_the_rule():
    m = tiny("gpt2")
    with pytest.raises(GraphError, match=r"embed's weight is read by aten.embedding.*"
                                         r"rule at <string>:1:1") as e:
        C.explain("* -> w4 gptq", m)
    assert e.value.node == "embed" and "embed -> rtn" in e.value.hint
    with pytest.raises(GraphError, match=r"awq on block.0.attn.qkv: its input block.0.ln_1 "
                                         r"is quantized") as e:
        C.explain("* -> w4 awq, a8\n" + EMB, m)
    assert e.value.node == "block.0.attn.qkv"
    C.explain("* -> w4 awq, a16\n" + EMB, m)                      # 16-bit inputs are fine


@pytest.mark.parametrize("recipe,line", [("* -> w32 gptq", 1), ("* -> fp16\nmlp.* -> awq", 2),
                                         ("* -> gptq\nlm_head -> w4", 1)])
def test_rounding_weights_that_stay_float_is_an_error_at_the_rule(recipe, line):
    with pytest.raises(PlanError) as e:
        C.explain(recipe, tiny("gpt2"))
    (d,) = e.value.diagnostics                                     # one per rule, not per node
    assert d.line == line and "whose weights stay float" in d.message


def test_a_later_skip_of_a_rounded_weight_is_fine():
    q = C.explain("* -> w4 gptq\n" + EMB + "lm_head -> skip", tiny("gpt2"))
    assert q.plan["lm_head"].weight.quantized is False
    assert q.plan["block.0.mlp.c_fc"].weight.rounding is not None


def test_shared_inputs_share_one_recorder_and_the_hessian_is_the_inputs():
    """q, k and v read one input: one InputStats, holding 2 X X^T / n of that input."""
    from qdsl.graph.capture import capture
    from qdsl.graph.naming import name_graph
    from qdsl.lang.loader import parse_recipe
    from qdsl.passes.pipeline import OBSERVE, PassContext, run
    from qdsl.plan import build_plan
    m = tiny("llama")
    cap = capture(m, mode="plain")
    named = name_graph(cap)
    ctx = PassContext(named, build_plan(parse_recipe("attn.* -> w4 gptq"), named))
    run(OBSERVE, cap.gm, ctx, check=True)
    stats = ctx.input_stats
    assert stats["block.0.attn.q"] is stats["block.0.attn.k"] is stats["block.0.attn.v"]
    assert stats["block.0.attn.out"] is not stats["block.0.attn.q"]
    ids = tiny_ids(m, 2, 8)
    seen = []
    hook = m.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        cap.gm(ids)
        m(ids)
    hook.remove()
    x = seen[0]
    assert torch.allclose(stats["block.0.attn.q"].hessian(), 2 * x.T @ x / x.shape[0],
                          rtol=1e-4, atol=1e-5)
