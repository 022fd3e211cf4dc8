"""fuse_attention: eager attention chains become one FusedAttention (SDPA over the
filled part of the cache) with the same outputs; chains with a quantizer inside stay."""

import warnings

import pytest
import torch
from tiny import CAUSAL, tiny, tiny_ids

import qdsl.compiler as C
from qdsl.graph.capture import capture
from qdsl.runtime.graphlm import GraphLM
from qdsl.passes.fuse_attention import ATTN_PREFIX, find_attention, fuse_attention
from qdsl.runtime.attention import FusedAttention

CACHE = 32


def _matmuls(gm) -> int:
    return sum(1 for n in gm.graph.nodes if str(n.target) in ("aten.matmul.default",
                                                                 "aten.softmax.int"))


def _run(gm, ids):
    """Whole-window logits, then a prefill of 5 tokens and 3 decode steps."""
    full = GraphLM(gm, CACHE).logits(ids)
    lm = GraphLM(gm, CACHE)
    steps = [lm.prefill(ids[:, :5])] + [lm.decode(int(t)) for t in ids[0, 5:8]]
    return full, torch.stack(steps)


@pytest.mark.parametrize("family", CAUSAL)
def test_same_logits_prefill_and_decode(family):
    m = tiny(family)
    gm = capture(m, mode="generate", max_cache_len=CACHE).gm
    ids = tiny_ids(m, 1, 12)
    ref_full, ref_steps = _run(gm, ids)
    done = fuse_attention(gm)
    assert len(done) == m.config.num_hidden_layers
    assert _matmuls(gm) == 0                       # scores, softmax and context are gone
    full, steps = _run(gm, ids)
    torch.testing.assert_close(full, ref_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(steps, ref_steps, rtol=1e-5, atol=1e-5)


def test_gqa_reads_the_cache_without_repeat_copies():
    m = tiny("llama")                              # 4 heads, 2 key/value heads
    gm = capture(m, mode="generate", max_cache_len=CACHE).gm
    fuse_attention(gm)
    mods = [gm.get_submodule(n.target) for n in gm.graph.nodes
            if n.op == "call_module" and n.target.startswith(ATTN_PREFIX)]
    assert mods and all(isinstance(x, FusedAttention) and x.gqa for x in mods)
    assert not any(str(n.target) == "aten.expand.default" and n.args[1][2] == 2
                   for n in gm.graph.nodes)        # repeat_kv's [b, kv, 2, L, d] expands


def test_module_slices_to_the_filled_cache():
    """The dropped cache columns are masked, so slicing changes nothing."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    pos = torch.arange(4, 7)
    mask = torch.where(torch.arange(16)[None] <= pos[:, None], 0.0,
                       torch.finfo(torch.float32).min)[None, None]
    ref = torch.softmax(q @ k.transpose(2, 3) * 0.5 + mask, -1) @ v
    torch.testing.assert_close(FusedAttention(0.5)(q, k, v, mask, pos), ref)


def test_quantized_probs_keep_the_eager_chain():
    m = tiny("gpt2")
    recipe = "* -> w8 sym per_channel\nblock.0.attn.probs -> a8 dynamic per_token"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = C.compile(m, recipe, lower="int8", max_cache_len=CACHE, progress=False)
        rows = C.explain(recipe, tiny("gpt2"), lower="int8").rows()
    fused = [n for n in q.gm.graph.nodes if n.op == "call_module"
             and n.target.startswith(ATTN_PREFIX)]
    assert len(fused) == 1                         # block 1 only
    assert len(find_attention(q.gm)) == 0          # block 0's chain has a quantizer inside
    ex = {r["name"]: r["exec"] for r in rows}
    assert ex["block.0.attn.probs"] == "simulated (fake-quant)"
    assert ex["block.0.attn.scores"] == "float"
    assert ex["block.1.attn.probs"] == ex["block.1.attn.scores"] == "float (fused attention)"


@pytest.mark.parametrize("heads,kv_heads,d", [(9, 3, 64), (4, 4, 16), (8, 1, 32), (6, 2, 12)])
@pytest.mark.parametrize("mask", [None, "float", "per_head", "bool", "neg_inf"])
def test_one_token_attention_matches_sdpa(heads, kv_heads, d, mask):
    """A decode step's attention (qdsl's C++ kernel where it applies: float masks, head
    size a multiple of 8; SDPA otherwise) is SDPA's over the filled part of the cache,
    GQA heads grouped, for batch 2 and every mask form."""
    from qdsl.runtime.attention import _attend
    g = torch.Generator().manual_seed(heads * 100 + kv_heads * 10 + d)
    q = torch.randn(2, heads, 1, d, generator=g)
    k, v = (torch.randn(2, kv_heads, 40, d, generator=g) for _ in range(2))
    neg = torch.zeros(2, 1, 1, 40)
    neg[0, ..., 3:9] = float("-inf")                  # left padding of row 0
    m = {None: None, "float": torch.randn(2, 1, 1, 40, generator=g),
         "per_head": torch.randn(2, heads, 1, 40, generator=g),
         "bool": torch.rand(2, 1, 1, 40, generator=g) > 0.3, "neg_inf": neg}[mask]
    pos = torch.tensor([30])          # the cache holds 31 positions of 40
    got = _attend(q, k, v, m, pos, 0.25, kv_heads != heads)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k[:, :, :31], v[:, :, :31], attn_mask=None if m is None else m[..., :31], scale=0.25,
        enable_gqa=kv_heads != heads)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_one_token_attention_runs_the_kernel_where_it_applies(monkeypatch):
    """The C++ kernel takes float32 decode steps with a float mask (the decode graph's);
    a bool mask or an odd head size goes to SDPA."""
    from qdsl.runtime import attention
    if not attention._kernel_built():
        pytest.skip("qdsl's C++ kernels unavailable here (SDPA runs every step)")
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 10, 16)
    assert attention._one_token_kernel(q, k, k, None)
    assert attention._one_token_kernel(q, k, k, torch.zeros(1, 1, 1, 10))
    assert not attention._one_token_kernel(q, k, k, torch.ones(1, 1, 1, 10, dtype=torch.bool))
    assert not attention._one_token_kernel(torch.randn(1, 4, 2, 16), k, k, None)   # prefill
    assert not attention._one_token_kernel(q[..., :12], k[..., :12], k[..., :12], None)
    for dt in (torch.float16, torch.bfloat16):                # a 16-bit cache
        assert attention._one_token_kernel(q, k.to(dt), k.to(dt), torch.zeros(1, 1, 1, 10))
        assert not attention._one_token_kernel(q, k.to(dt), k, None)    # k and v differ
        assert not attention._one_token_kernel(q.to(dt), k.to(dt), k.to(dt), None)


@pytest.mark.parametrize("batch,kv_heads", [(1, 3), (1, 1), (2, 1)])
@pytest.mark.parametrize("mask", [None, "per_head", "pad"])
def test_long_cache_attention_split_over_keys_matches_sdpa(batch, kv_heads, mask):
    """With fewer key/value heads than two per thread, the C++ kernel splits the keys
    into chunks (2 threads here) and merges their softmax statistics: still SDPA's
    result, also where a whole chunk is masked out (left padding over the first 400
    keys of row 0)."""
    from qdsl.runtime import attention
    if not attention._kernel_built():
        pytest.skip("qdsl's C++ kernels unavailable here (SDPA runs every step)")
    heads, d, n, cache = 3 * kv_heads, 64, 601, 700
    g = torch.Generator().manual_seed(batch * 10 + kv_heads)
    q = torch.randn(batch, heads, 1, d, generator=g)
    k, v = (torch.randn(batch, kv_heads, cache, d, generator=g) for _ in range(2))
    pad = torch.zeros(batch, 1, 1, cache)
    pad[0, ..., :400] = float("-inf")
    m = {None: None, "per_head": torch.randn(batch, heads, 1, cache, generator=g),
         "pad": pad}[mask]
    pos = torch.tensor([n - 1])
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = attention._attend(q, k, v, m, pos, 0.125, kv_heads != heads)
    finally:
        torch.set_num_threads(old)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k[:, :, :n], v[:, :, :n], attn_mask=None if m is None else m[..., :n], scale=0.125,
        enable_gqa=kv_heads != heads)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128, 32])
@pytest.mark.parametrize("n,threads", [(1, 1), (3, 1), (17, 1), (300, 1), (300, 2)])
def test_decode_attention_paths_agree_with_sdpa(d, n, threads, dtype):
    """Each instruction-set path of the C++ decode attention this CPU can run (AVX2 for
    every head size; AVX-512 for 64 and 128 where the capability has it) gives SDPA's
    result: key counts below, at and past the 4-key and 16-key blocks, a per-head mask
    with a padded prefix, and the split over keys on 2 threads. A float16 / bfloat16
    cache is widened exactly as it is read: SDPA's result on the same rounded values in
    float32, to the float32 cache's tolerance."""
    from qdsl.runtime import attention
    if not attention._kernel_built():
        pytest.skip("qdsl's C++ kernels unavailable here (SDPA runs every step)")
    g = torch.Generator().manual_seed(d + n)
    heads, kv_heads, cache = 9, 3, 320
    q = torch.randn(1, heads, 1, d, generator=g)
    k, v = (torch.randn(1, kv_heads, cache, d, generator=g).to(dtype) for _ in range(2))
    kf, vf = k.float(), v.float()
    mask = torch.randn(1, heads, 1, cache, generator=g)
    mask[..., : n // 3] = float("-inf")
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, kf[:, :, :n], vf[:, :, :n], attn_mask=mask[..., :n], scale=0.125, enable_gqa=True)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, kf[:, :, :n], vf[:, :, :n], scale=0.125, enable_gqa=True)

    def check(isa):
        got = torch.ops.qdsl_kernels.decode_attention(q, k, v, mask, n, 0.125, isa)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, msg=f"isa {isa}")
        pos = torch.tensor([n - 1])
        got = torch.ops.qdsl_kernels.cached_decode_attention(q, k, v, None, pos, 0.125, isa)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"isa {isa}")
    _on_each_path(threads, check)


@pytest.mark.parametrize("heads,kv_heads", [(12, 12), (8, 4), (14, 2), (16, 2), (15, 3)])
@pytest.mark.parametrize("d", [64, 128, 40])
@pytest.mark.parametrize("n,threads", [(6, 1), (301, 1), (301, 2)])
def test_decode_attention_group_sizes_agree_with_sdpa(heads, kv_heads, d, n, threads):
    """Every query-head group size a key/value head serves (1: GPT-2; 2, 4; 7: Qwen2.5-
    Coder-0.5B; 8; 5) on each instruction-set path: the AVX-512 path's value pass splits
    groups over 4 (over 3 at head size 128) into register tiles, the AVX2 path keeps a
    head's output in registers by 64-, 32- and 8-column chunks (40 = 32 + 8); a float16
    cache, SDPA's result on its values."""
    from qdsl.runtime import attention
    if not attention._kernel_built():
        pytest.skip("qdsl's C++ kernels unavailable here (SDPA runs every step)")
    g = torch.Generator().manual_seed(heads * 1000 + d + n)
    q = torch.randn(1, heads, 1, d, generator=g)
    k, v = (torch.randn(1, kv_heads, 320, d, generator=g).half() for _ in range(2))
    mask = torch.randn(1, heads, 1, 320, generator=g)
    mask[..., : n // 3] = float("-inf")
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k[:, :, :n].float(), v[:, :, :n].float(), attn_mask=mask[..., :n], scale=0.125,
        enable_gqa=kv_heads != heads)
    _on_each_path(threads, lambda isa: torch.testing.assert_close(
        torch.ops.qdsl_kernels.decode_attention(q, k, v, mask, n, 0.125, isa), ref,
        rtol=1e-5, atol=1e-6, msg=f"isa {isa}"))


def _on_each_path(threads, check):
    """check(isa) for each instruction-set path of the C++ decode attention this CPU can
    run (AVX2, and the capability's own where higher), torch on `threads` threads."""
    from qdsl.runtime import kernels
    from qdsl.runtime.kernels.cpu import ISA_AVX2
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for isa in sorted({ISA_AVX2, kernels.table().cap.isa}):
            check(isa)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5])
def test_half_cache_matches_the_float32_cache(dtype, tokens):
    """FusedAttention on a float16 / bfloat16 cache is the float32 cache's holding the same
    rounded values: a decode token (the C++ kernel, widening as it reads) and a prefill
    (SDPA on the filled part, converted), both with cache_position over a longer cache."""
    from qdsl.runtime import attention
    g = torch.Generator().manual_seed(tokens)
    heads, kv_heads, d, cache = 9, 3, 64, 48
    q = torch.randn(1, heads, tokens, d, generator=g)
    k16, v16 = (torch.randn(1, kv_heads, cache, d, generator=g).to(dtype) for _ in range(2))
    k32, v32 = k16.float(), v16.float()
    pos = torch.arange(30 - tokens, 30)            # the cache holds 30 positions of 48
    mask = torch.where(torch.arange(cache)[None] <= pos[:, None], 0.0,
                       torch.finfo(torch.float32).min)[None, None]
    kernel = tokens == 1 and attention._kernel_built()
    if kernel:
        assert attention._one_token_kernel(q, k16, v16, mask)
    fa = FusedAttention(d ** -0.5, gqa=True)
    got, want = fa(q, k16, v16, mask, pos), fa(q, k32, v32, mask, pos)
    assert got.dtype == torch.float32
    if kernel:       # the same instructions on the same float32 values: bit for bit
        assert torch.equal(got, want)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)



def test_calibration_runs_fused_attention_except_where_the_plan_quantizes(monkeypatch):
    """OBSERVE fuses the attentions with no planned node inside before calibration
    (block 1 here); block 0, whose scores are observed, stays eager. The scales match
    a calibration through the eager chains up to float summation order."""
    import qdsl.compiler.build as build
    from qdsl.passes.pipeline import OBSERVE
    m = tiny("llama")
    recipe = ("* -> w8 sym per_channel\ntype:Linear.input -> a8 sym per_tensor mse static\n"
              "block.0.attn.scores -> a8 sym per_tensor minmax static\n")
    ids = tiny_ids(m, 3, 16)
    calls = []
    forward = FusedAttention.forward
    monkeypatch.setattr(FusedAttention, "forward",
                        lambda self, *a: calls.append(1) or forward(self, *a))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = C.compile(m, recipe, calib=ids, max_cache_len=CACHE, progress=False)
        assert len(calls) == 3 * (m.config.num_hidden_layers - 1)   # 3 windows, block 1
        monkeypatch.setattr(build, "OBSERVE", OBSERVE[:-1])
        eager = C.compile(tiny("llama"), recipe, calib=ids, max_cache_len=CACHE, progress=False)
    assert len(calls) == 3 * (m.config.num_hidden_layers - 1)       # none: all eager
    fused = [n for n in q.gm.graph.nodes if n.op == "call_module"
             and n.target.startswith(ATTN_PREFIX)]
    assert len(fused) == m.config.num_hidden_layers - 1
    assert OBSERVE[-1].name == "fuse_unplanned_attention"
    a, b = q.frozen.to_state()[1], eager.frozen.to_state()[1]
    assert a.keys() == b.keys() and any("scores" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=0)
