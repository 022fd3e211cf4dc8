"""The fused decode step (qdsl.runtime.fused, qdsl_kernels::llama_decode_step): a whole
w8a8 / w4a8 / w4 LLaMA step in one C++ call gives the graph's logits and completions (every ISA
path, 1 and 2 threads, float32 / float16 caches, 4-bit weights and embedding, w8a8 and
w4a8 linears in one step, q / k / v biases, key chunks split over threads), refuses
graphs it does not compute with the reason, and falls back to the wrapped step when its
first-call check fails."""

import logging
from pathlib import Path

import pytest
import torch
from tiny import tiny, tiny_ids

import qdsl.compiler as C
from qdsl.runtime import fused
from qdsl.runtime.graphlm import GraphLM
from qdsl.runtime.kernels import cext
from qdsl.runtime.kernels.cpu import capability

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "int8"
W8A8 = (RECIPES / "w8a8_dynamic.qrec").read_text()
KV16 = W8A8 + "\nset lower.kv_cache = fp16\n"
# 4-bit weights (groups of 32) times 8-bit dynamic activations, a 4-bit embedding and head
W4A8 = (RECIPES / "w4a8_dynamic.qrec").read_text() + "\nset lower.kv_cache = fp16\n"
# w8a8 attention, w4a8 MLP: the step switches kernels (and input layouts) per linear
MIXED = KV16 + "\nblock.*.mlp.* -> w4 sym group(size=32)\n"
# 4-bit weight-only (recipes/int8/w4_group64.qrec at the tiny model's group size): the
# linears read the float input
W4 = "* -> w4 sym group(size=32)\nset lower.kv_cache = fp16\n"
# q / k / v w4a8 (their input quantized), every other linear 4-bit weight-only
W4_MIXED = W4 + "block.*.ln_1 -> a8 sym per_token dynamic\n"

pytestmark = pytest.mark.skipif(not cext.load(), reason="qdsl's C++ kernels unavailable here")


def _artifact(recipe: str, cache: int = 32, **overrides):
    m = tiny("llama", **overrides)
    q = C.compile(m, recipe, calib=tiny_ids(m, 2, 16), lower="int8", max_cache_len=cache,
                  progress=False)
    return m, q.gm


def _fused_lm(gm, cache):
    lm = GraphLM(gm, cache, compile_decode=False)
    lm.step = fused.FusedStep(gm, lambda: gm, "test")   # falls back to the graph eager
    return lm


def _steps(lm, ids, prompt=5, n=12):
    out = [lm.prefill(ids[:, :prompt])]
    out += [lm.decode(int(t)) for t in ids[0, prompt:prompt + n]]
    return torch.stack(out)


def _isas():
    """Every instruction-set path this CPU can run (generic .. its own)."""
    return list(range(capability().isa + 1))


def _assert_forced_isa_matches(gm, isa: int, seed: int) -> None:
    """The fused step, checked on this CPU's path at its first decode and then forced onto
    ``isa``, gives the eager graph's logits."""
    ids = tiny_ids(tiny("llama"), 1, 20, seed=seed)
    ref = _steps(GraphLM(gm, 32, compile_decode=False), ids)
    lm = _fused_lm(gm, 32)
    got = [lm.prefill(ids[:, :5]), lm.decode(int(ids[0, 5]))]   # checked, then forced
    assert lm.step.active, lm.step.why
    lm.step.plan.isa = isa
    got += [lm.decode(int(t)) for t in ids[0, 6:17]]
    torch.testing.assert_close(torch.stack(got), ref, rtol=1e-4,
                               atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("recipe", [W8A8, KV16, W4A8, MIXED, W4, W4_MIXED],
                         ids=["fp32-cache", "fp16-cache", "w4a8", "w8a8-attn-w4a8-mlp", "w4",
                              "w4a8-qkv-w4-rest"])
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_step_gives_the_graphs_logits_and_completions(recipe, threads):
    _, gm = _artifact(recipe)
    ids = tiny_ids(tiny("llama"), 1, 20, seed=3)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ref = _steps(GraphLM(gm, 32, compile_decode=False), ids)
        lm = _fused_lm(gm, 32)
        got = _steps(lm, ids)
        assert lm.step.active and lm.step.why is None and lm.step.wrapper == "fused"
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
        prompt = ids[:, :5]
        assert _fused_lm(gm, 32).greedy(prompt, 20) == \
            GraphLM(gm, 32, compile_decode=False).greedy(prompt, 20)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("recipe", [KV16, W4A8, W4], ids=["w8a8", "w4a8", "w4"])
@pytest.mark.parametrize("isa", _isas())
def test_every_isa_path_matches_the_graph(isa, recipe):
    """generic C++, AVX2, AVX-512, VNNI GEMVs (w8a8, w4a8, w4) and both attention paths:
    same logits."""
    _, gm = _artifact(recipe)
    _assert_forced_isa_matches(gm, isa, seed=5)


@pytest.mark.parametrize("isa", _isas())
def test_every_isa_path_is_exact_at_the_code_extremes(isa):
    """The AVX2 / AVX-512 row kernel multiplies |w| by x carrying w's sign (vpmaddubsw):
    exact only because |w| <= 128 and |x| <= 127. Weights full of -128 and 127 codes
    (each token's largest input is always a +-127 code) give the graph's logits on
    every path."""
    _, gm = _artifact(KV16)
    p, why = fused.plan(gm)
    assert p is not None, why
    g = torch.Generator().manual_seed(0)
    for w in p.w:
        r = torch.rand(w.shape, generator=g)
        w[r < 0.3] = -128
        w[r > 0.85] = 127
    _assert_forced_isa_matches(gm, isa, seed=6)


@pytest.mark.parametrize("isa", _isas())
def test_every_isa_path_reads_all_16_nibble_values(isa):
    """The w4 weight-only kernels re-centre every nibble (u - 8) and take a byte's low
    nibble as the even column (the input's codes are split into even and odd columns):
    packed bytes drawn from all 256 values (codes 0..15, outside the recipe's 1..15
    too) give the graph's logits on every path."""
    _, gm = _artifact(W4)
    p, why = fused.plan(gm)
    assert p is not None, why
    g = torch.Generator().manual_seed(1)
    for w in p.w:
        w.copy_(torch.randint(0, 256, w.shape, generator=g, dtype=torch.uint8))
    _assert_forced_isa_matches(gm, isa, seed=7)


def test_biases_and_key_chunks_over_two_threads():
    """q / k / v / o biases (Qwen2's q / k / v have them), and a cache long enough that two
    threads split each key/value head's keys into chunks and merge them."""
    cache = 320
    m, gm = _artifact(W8A8, cache=cache, attention_bias=True, max_position_embeddings=cache)
    assert gm.get_submodule("qdsl_int8__block_0_attn_q").bias is not None
    ids = torch.randint(1, 128, (1, 300), generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ref = _steps(GraphLM(gm, cache, compile_decode=False), ids, prompt=280, n=8)
        lm = _fused_lm(gm, cache)
        got = _steps(lm, ids, prompt=280, n=8)
    finally:
        torch.set_num_threads(before)
    assert lm.step.active
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("recipe, why", [
    (W8A8.replace("ln_1         -> a8 sym", "ln_1         -> a8 asym"), "asymmetric"),
    (W8A8.replace("ln_1         -> a8 sym per_token dynamic", "ln_1 -> a8 sym"),
     "Int8StaticLinear"),
    ((RECIPES / "w8_weight_only.qrec").read_text(), "Int8WeightOnlyLinear"),
    (W8A8 + "\nblock.*.res_sum -> a8 sym per_token dynamic\n", "DynamicFakeQuant"),
    (W4A8.replace("ln_1         -> a8 sym", "ln_1         -> a8 asym"), "asymmetric"),
    (W4 + "set lower.compute = fp32\n", "compute_dtype 'fp32'"),
    (W4 + "block.*.mlp.* -> w2 sym group(size=32)\n", "2-bit"),
], ids=["asym", "static", "weight-only", "res-sum", "w4a8-asym", "w4-fp32", "w2"])
def test_plan_refuses_what_it_does_not_compute(recipe, why):
    _, gm = _artifact(recipe)
    plan, reason = fused.plan(gm)
    assert plan is None and why in reason


def test_a_failed_check_falls_back_and_keeps_the_graphs_cache(monkeypatch, caplog):
    _, gm = _artifact(KV16)
    ids = tiny_ids(tiny("llama"), 1, 20, seed=3)
    ref = _steps(GraphLM(gm, 32, compile_decode=False), ids)
    monkeypatch.setattr(fused.Plan, "__call__",
                        lambda self, input_ids, pos: torch.zeros(1, 1, 128))
    lm = _fused_lm(gm, 32)
    with caplog.at_level(logging.WARNING, logger="qdsl.runtime.fused"):
        got = _steps(lm, ids)
    assert not lm.step.active and "differ from the graph's" in lm.step.why
    assert sum("fused decode step of test is off" in r.message for r in caplog.records) == 1
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_env_switch_and_the_step_graphlm_builds(monkeypatch):
    from qdsl.runtime.compiled import CompiledStep
    _, gm = _artifact(W8A8)
    monkeypatch.setenv(fused.ENV, "0")
    assert isinstance(GraphLM(gm, 32, compile_decode=True).step, CompiledStep)
    monkeypatch.delenv(fused.ENV)
    assert isinstance(GraphLM(gm, 32, compile_decode=True).step, fused.FusedStep)
    assert GraphLM(gm, 32, compile_decode=False).step is None


def test_batch_graphs_and_prefill_go_to_the_wrapped_step():
    """Only one-token batch-1 calls run fused; anything else (here: a call with another
    input) goes to the fallback, said in ``why``."""
    _, gm = _artifact(W8A8)
    calls = []

    def fallback():
        calls.append(1)
        return gm
    step = fused.FusedStep(gm, fallback, "test")
    out = step(input_ids=torch.tensor([[1, 2]]), cache_position=torch.tensor([0, 1]))
    assert out.shape[:2] == (1, 2) and calls == [1] and "not one token" in step.why


def test_a_misread_rotary_table_is_caught_by_layer_0s_rows(monkeypatch):
    """The first step's check compares layer 0's key / value rows: a plan whose rotary
    scaling is wrong (as a rope variant it does not know would be) is refused there."""
    _, gm = _artifact(W8A8)
    real = fused.plan

    def misread(g):
        p, why = real(g)
        p.rope_scale = 0.5
        return p, why
    monkeypatch.setattr(fused, "plan", misread)
    ids = tiny_ids(tiny("llama"), 1, 20, seed=3)
    ref = _steps(GraphLM(gm, 32, compile_decode=False), ids)
    lm = _fused_lm(gm, 32)
    got = _steps(lm, ids)
    assert not lm.step.active and "layer 0's keys / values" in lm.step.why
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_a_constant_multiplier_in_the_graph_is_refused():
    """An embedding or residual multiplier (Granite-style) is not a LLaMA step."""
    _, gm = _artifact(W8A8)
    embed = next(n for n in gm.graph.nodes if n.op == "call_module"
                 and n.target == "qdsl_int8__embed")
    with gm.graph.inserting_after(embed):
        scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (embed, 12.0))
    embed.replace_all_uses_with(scaled)
    scaled.args = (embed, 12.0)
    gm.recompile()
    plan, why = fused.plan(gm)
    assert plan is None and "by the constant 12.0" in why
