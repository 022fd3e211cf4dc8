"""The kv_cache pass (``set lower.kv_cache``): a 16-bit key/value cache, simulated by
``--lower fake`` and stored by ``--lower int8``; the same numbers either way, the
caches of an int8 graph really 16-bit, saved and loaded as such, and a clear error
where a model has no cache."""

import pytest
import torch
from tiny import tiny, tiny_ids

import qdsl.compiler as C
from qdsl.errors import GraphError, OptionError
from qdsl.lang import parse_recipe
from qdsl.passes.kv_cache import KV_DTYPES, cache_tensors, kv_cache
from qdsl.runtime.graphlm import GraphLM

CACHE = 32
W8A8 = "* -> w8 sym per_channel\nop:linear -> a8 sym per_token dynamic\n"
# weight-only int8 dequantized per call: the int8 graph computes the fake one's maths
# (to ~1e-7), so what differs between lowerings is the cache alone
EXACT = "* -> w8 sym per_channel\nset lower.compute = fp32\n"


def _compile(kv: str, lower: str, recipe: str = W8A8):
    m = tiny("llama")
    return m, C.compile(m, recipe + f"set lower.kv_cache = {kv}\n", calib=tiny_ids(m, 2, 16),
                        lower=lower, max_cache_len=CACHE, progress=False, check=True)


def _steps(lm, ids, n=8):
    """Prefill 5 tokens, then n teacher-forced decode steps: the stacked logits."""
    out = [lm.prefill(ids[:, :5])]
    out += [lm.decode(int(t)) for t in ids[0, 5:5 + n]]
    return torch.stack(out)


def _caches(gm) -> list[torch.Tensor]:
    """The graph's cache tensors, in write order."""
    return list(cache_tensors(gm).values())


def test_setting_parses_and_is_checked():
    r = parse_recipe("set lower.kv_cache = bf16\n* -> w8")
    assert r.settings.lower_kv_cache == "bf16"
    assert r.settings.to_json()["lower_kv_cache"] == "bf16"
    assert "lower_kv_cache" not in parse_recipe("* -> w8").settings.to_json()  # sweep keys
    with pytest.raises(Exception, match=r"`lower.kv_cache` must be one of fp32, fp16, bf16"):
        parse_recipe("set lower.kv_cache = f16\n* -> w8")


@pytest.mark.parametrize("kv", ["fp16", "bf16"])
def test_int8_stores_16bit_cache_and_fake_simulates_it(kv):
    """Fake keeps float32 caches holding only kv-representable values; int8's caches
    are kv; both give the same logits (prefill on SDPA, decode on the C++ kernel)."""
    m, fake = _compile(kv, "fake", EXACT)
    _, int8 = _compile(kv, "int8", EXACT)
    _, ref = _compile("fp32", "int8", EXACT)
    ids = tiny_ids(m, 1, 16, seed=3)
    got_fake = _steps(GraphLM(fake.gm, CACHE, compile_decode=False), ids)
    got_int8 = _steps(GraphLM(int8.gm, CACHE, compile_decode=False), ids)
    want = _steps(GraphLM(ref.gm, CACHE, compile_decode=False), ids)
    dt = KV_DTYPES[kv]
    assert len(_caches(int8.gm)) == 2 * 2 and all(c.dtype == dt for c in _caches(int8.gm))
    for c in _caches(fake.gm):
        assert c.dtype == torch.float32 and c.abs().sum() > 0      # written, and exactly kv
        torch.testing.assert_close(c.to(dt).float(), c, rtol=0, atol=0)
    assert all(c.dtype == torch.float32 for c in _caches(ref.gm))
    torch.testing.assert_close(got_int8, got_fake, rtol=1e-6, atol=1e-6)   # summation order
    # rounding keys and values moves the logits a little (far more than the lowerings
    # differ, so the check above sees the rounding), not a lot
    moved = (got_int8 - want).abs().max()
    assert 1e-5 < moved < 0.01 * want.abs().max()


def test_saved_artifact_keeps_the_16bit_cache(tmp_path):
    """graph.json (no capture) and the capture path both rebuild fp16 caches."""
    from qdsl.compiler.loading import load_artifact_lm
    m, q = _compile("fp16", "int8")
    q.save(tmp_path / "a")
    ids = tiny_ids(m, 1, 16, seed=4)
    want = _steps(GraphLM(q.gm, CACHE, compile_decode=False), ids)
    lm = load_artifact_lm(tmp_path / "a")                      # the stored graph
    assert [c.dtype for c in _caches(lm.gm)] == [torch.float16] * 4
    torch.testing.assert_close(_steps(lm, ids), want, rtol=0, atol=0)
    for other in (load_artifact_lm(tmp_path / "a", max_cache_len=48),   # another cache
                  load_artifact_lm(tmp_path / "a", batch_size=2)):      # padded rows
        assert [c.dtype for c in _caches(other.gm)] == [torch.float16] * 4
    again = C.load(tmp_path / "a", m)                          # capture + INT8 passes
    assert [c.dtype for c in _caches(again.gm)] == [torch.float16] * 4
    torch.testing.assert_close(_steps(GraphLM(again.gm, CACHE, compile_decode=False), ids),
                               want, rtol=0, atol=0)


def test_model_without_cache_is_an_error():
    """An encoder (plain graph) has no cache: compile and explain refuse the setting;
    the pass itself refuses a graph with no cache write."""
    m = tiny("bert")
    with pytest.raises(OptionError, match="BertModel is not a causal LM"):
        C.compile(m, W8A8 + "set lower.kv_cache = fp16\n", calib=tiny_ids(m, 2, 8),
                  progress=False)
    with pytest.raises(OptionError, match="BertModel is not a causal LM"):
        C.explain(W8A8 + "set lower.kv_cache = fp16\n", m)
    gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))
    with pytest.raises(GraphError, match="writes no key/value cache"):
        kv_cache(gm, "fp16", store=True)
    assert kv_cache(gm, "fp32", store=True) == 0 and kv_cache(gm, None, store=False) == 0


def test_explain_says_what_the_cache_holds():
    m = tiny("llama")
    text = C.explain(W8A8 + "set lower.kv_cache = bf16\n", m, lower="int8").summary()
    assert "key/value cache: bf16" in text and "stored in bf16" in text
    assert "key/value cache" not in C.explain(W8A8, m).summary()


@pytest.mark.slow
def test_compiled_step_on_a_16bit_cache(tmp_path, monkeypatch):
    """The compiled decode step (inductor, the C++ attention as an opaque op) reads the
    fp16 cache in place: the eager graph's logits and greedy tokens."""
    from qdsl.runtime import compiled
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv(compiled.CHECKS_ENV, "1")
    monkeypatch.setenv("QDSL_FUSED_DECODE", "0")    # the compiled step, not the fused one
    m, q = _compile("fp16", "int8")
    ids = tiny_ids(m, 1, 16, seed=5)
    eager = GraphLM(q.gm, CACHE, compile_decode=False)
    lm = GraphLM(q.gm, CACHE, compile_decode=True)
    want, got = _steps(eager, ids), _steps(lm, ids)
    assert lm.step.failed is None and lm.step.direct
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert eager.greedy(ids[:, :5], 12) == lm.greedy(ids[:, :5], 12)


def test_fp16_cache_needs_f16c(monkeypatch):
    """Without F16C the fp16 cache goes to SDPA (same numbers); bf16 needs no F16C."""
    from qdsl.runtime import attention
    q = torch.randn(1, 4, 1, 64)
    k16 = torch.randn(1, 2, 32, 64).half()
    if not attention._kernel_built():
        pytest.skip("qdsl's C++ kernels unavailable here")
    assert attention._one_token_kernel(q, k16, k16, None)
    monkeypatch.setattr(attention, "_has_f16c", lambda: False)
    assert not attention._one_token_kernel(q, k16, k16, None)
    assert attention._one_token_kernel(q, k16.bfloat16(), k16.bfloat16(), None)
    pos = torch.tensor([20])
    got = attention.FusedAttention(0.125, gqa=True)(q, k16, k16, None, pos)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k16[:, :, :21].float(), k16[:, :, :21].float(), scale=0.125, enable_gqa=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
