"""The compiled decode step (qdsl.runtime.compiled): the same logits and completions as
the eager graph on tiny models (float graph with fused attention, w8a8 int8 artifact
running qdsl's C++ kernels as opaque ops), in-place cache updates across steps, and
the eager fallback when compiling fails."""

import logging
import os
from pathlib import Path

import pytest
import torch
from tiny import tiny, tiny_ids

import qdsl.compiler as C
from qdsl.graph.capture import capture
from qdsl.passes.fuse_attention import fuse_attention
from qdsl.runtime import compiled
from qdsl.runtime.graphlm import GraphLM

CACHE = 32


@pytest.fixture(autouse=True)
def _compile_checks(monkeypatch):
    """inductor's size / stride asserts on: they check the opaque ops' fake impls
    against what the kernels return (production steps run without them); the compiled
    step itself, not the fused one a w8a8 LLaMA would run (test_fused_decode.py)."""
    monkeypatch.setenv(compiled.CHECKS_ENV, "1")
    monkeypatch.setenv("QDSL_FUSED_DECODE", "0")
W8A8 = "* -> w8 sym per_channel\nop:linear -> a8 sym per_token dynamic"


def _steps(lm, ids, n=6):
    """Prefill 5 tokens, then n decode steps fed the prompt's next tokens (teacher
    forcing, so both paths see the same inputs), as stacked logits."""
    out = [lm.prefill(ids[:, :5])]
    out += [lm.decode(int(t)) for t in ids[0, 5:5 + n]]
    return torch.stack(out)


def _int8_compiled_and_eager(recipe: str, seed: int):
    """A tiny llama compiled ``--lower int8`` with ``recipe``, run eager and compiled on
    the same ids: (eager LM, compiled LM, ids, eager logits, compiled logits)."""
    m = tiny("llama")
    q = C.compile(m, recipe, calib=tiny_ids(m, 2, 16), lower="int8", max_cache_len=CACHE,
                  progress=False)
    ids = tiny_ids(m, 1, 16, seed=seed)
    eager = GraphLM(q.gm, CACHE, compile_decode=False)
    lm = GraphLM(q.gm, CACHE, compile_decode=True)
    return eager, lm, ids, _steps(eager, ids), _steps(lm, ids)


def _float_graph(family):
    m = tiny(family)
    gm = capture(m, mode="generate", max_cache_len=CACHE).gm
    fuse_attention(gm)
    return m, gm


@pytest.mark.slow
def test_compiled_float_graph_matches_eager(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    m, gm = _float_graph("llama")
    ids = tiny_ids(m, 1, 16)
    ref = _steps(GraphLM(gm, CACHE, compile_decode=False), ids)
    lm = GraphLM(gm, CACHE, compile_decode=True)
    got = _steps(lm, ids)
    assert lm.step.failed is None and lm.step.compile_s is not None
    assert lm.step.direct                      # steps after the first skip dynamo's frame
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)   # fusion: summation order
    prompt = ids[:, :5]
    assert GraphLM(gm, CACHE, compile_decode=False).greedy(prompt, 20) == lm.greedy(prompt, 20)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["qdsl_w8a8", "float_gemm"])
def test_compiled_int8_artifact_matches_eager(tmp_path, monkeypatch, kernel):
    """Each w8a8 decode kernel forced: the table's own choice varies by machine."""
    from qdsl.runtime import kernels
    from qdsl.runtime.kernels import tuning
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    real = tuning.Table.choose
    monkeypatch.setattr(tuning.Table, "choose",
                        lambda self, op, m: kernel if op == "w8a8" else real(self, op, m))
    if kernel.startswith("qdsl_") and not kernels.table().ext:
        pytest.skip("qdsl's C++ kernels unavailable here")
    eager, lm, ids, ref, got = _int8_compiled_and_eager(W8A8, seed=3)
    assert lm.step.failed is None
    # the compiled graph calls the same C++ / torch GEMM kernels; per-token scales come
    # from fused loops, so codes may differ by one step at a rounding tie: logits close
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))
    prompt = ids[:, :5]
    assert eager.greedy(prompt, 20) == lm.greedy(prompt, 20)


def test_direct_calls_skip_dynamo_and_other_inputs_go_through_it(tmp_path, monkeypatch):
    """After the first step the compiled graph is called without dynamo's frame, with the
    same results as through it; a call with another input shape goes through dynamo
    (which recompiles it); ``QDSL_COMPILE_DIRECT=0`` keeps every call in dynamo."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv(compiled.BACKEND_ENV, "aot_eager")
    m, gm = _float_graph("llama")
    ids = tiny_ids(m, 1, 16, seed=2)
    ref = _steps(GraphLM(gm, CACHE, compile_decode=False), ids)
    lm = GraphLM(gm, CACHE, compile_decode=True)
    got = _steps(lm, ids)
    assert lm.step.direct
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    seen = []
    real = lm.step._fn
    lm.step._fn = lambda **kw: seen.append(sorted(kw)) or real(**kw)
    with torch.inference_mode():                 # as GraphLM calls it
        lm.step(input_ids=ids[:, 11:12], cache_position=torch.tensor([11]))   # direct
        assert seen == []
        two = ids[:, 11:13]                                                    # another shape
        lm.step(input_ids=two, cache_position=torch.tensor([11, 12]))
    assert seen == [["cache_position", "input_ids"]]
    monkeypatch.setenv(compiled.DIRECT_ENV, "0")
    off = GraphLM(gm, CACHE, compile_decode=True)
    torch.testing.assert_close(_steps(off, ids), ref, rtol=1e-5, atol=1e-5)
    assert off.step.compile_s is not None and not off.step.direct


def test_fallback_to_eager_says_so_once(monkeypatch, caplog):
    m, gm = _float_graph("llama")
    ids = tiny_ids(m, 1, 12)
    ref = _steps(GraphLM(gm, CACHE, compile_decode=False), ids, 3)

    def broken(*a, **k):
        def fn(**inputs):
            raise RuntimeError("no C++ compiler here")
        return fn
    monkeypatch.setattr(torch, "compile", broken)
    lm = GraphLM(gm, CACHE, compile_decode=True)
    with caplog.at_level(logging.WARNING, logger="qdsl.runtime.compiled"):
        got = _steps(lm, ids, 3)
    assert lm.step.failed == "RuntimeError: no C++ compiler here"
    warned = [r for r in caplog.records if "decoding eager" in r.getMessage()]
    assert len(warned) == 1 and "no C++ compiler here" in warned[0].getMessage()
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_env_switch(monkeypatch):
    monkeypatch.delenv(compiled.ENV, raising=False)
    assert not compiled.wanted() and compiled.wanted(True)
    monkeypatch.setenv(compiled.ENV, "0")
    assert not compiled.wanted(True)
    monkeypatch.setenv(compiled.ENV, "1")
    assert compiled.wanted(False)
    _, gm = _float_graph("llama")
    assert GraphLM(gm, CACHE).step is not None
    assert GraphLM(gm, CACHE, compile_decode=False).step is None


def test_inductor_cache_goes_under_the_qdsl_cache(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    monkeypatch.setenv("QDSL_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())   # what torch sets
    compiled._cache_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # the user's: kept
    compiled._cache_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["torch_int4pack_mm", "qdsl_w4"])
def test_compiled_w4_artifact_matches_eager(tmp_path, monkeypatch, kernel):
    """4-bit weights: aten's int4 kernel reads a layout derived from the stored codes
    once (``kernels.derived``), which must not break the compiled graph (it did: a data
    pointer comparison, so `qdsl bench --compile-decode` fell back to eager)."""
    from qdsl.runtime import kernels
    from qdsl.runtime.kernels import tuning
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    real = tuning.Table.choose
    monkeypatch.setattr(tuning.Table, "choose",
                        lambda self, op, m: kernel if op == "w4" else real(self, op, m))
    if kernel == "qdsl_w4" and not kernels.table().ext:
        pytest.skip("qdsl's C++ kernels unavailable here")
    eager, lm, ids, ref, got = _int8_compiled_and_eager("* -> w4 sym group(size=32)", seed=4)
    assert lm.step.failed is None
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))
    called = [0]
    impl = kernels.IMPLS["w4"][kernel]

    def counted(*args):
        called[0] += 1
        return impl(*args)

    monkeypatch.setitem(kernels.IMPLS["w4"], kernel, counted)
    eager.decode(int(ids[0, 12]))
    assert called[0] > 0            # the kernel under test is the one that ran


@pytest.mark.slow
def test_compiled_w4a8_artifact_matches_eager_and_calls_the_fused_kernel(tmp_path, monkeypatch):
    """w4a8 (recipes/int8/w4a8_dynamic.qrec): inductor compiles the step through the
    kernels' fake impls (size asserts on: they check them), q / k / v and gate / up as one
    ``w4a8_linear_cat`` call each, and the logits are eager's to float32 rounding."""
    from qdsl.runtime import kernels
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    if not kernels.table().ext:
        pytest.skip("qdsl's C++ kernels unavailable here")
    recipe = (Path(__file__).parents[2] / "recipes" / "int8" / "w4a8_dynamic.qrec").read_text()
    eager, lm, ids, ref, got = _int8_compiled_and_eager(recipe, seed=6)
    assert lm.step.failed is None and lm.step.fused == 2 * 2        # 2 layers, 2 groups each
    assert lm.step.direct
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))
    assert lm.greedy(ids[:, :5], 6) == eager.greedy(ids[:, :5], 6)


def test_compiled_int4_kernel_stays_an_opaque_op():
    """Inductor lowers aten's int4 kernel to an extern call that corrupted the heap on
    SmolLM2's w4 artifact with a 1,024-slot cache (torch 2.13; eager ran clean): a
    compiled graph must call it through ``qdsl::int4pack_mm``, and get eager's numbers."""
    from qdsl.runtime.kernels import impls
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("this torch has no _weight_int4pack_mm_for_cpu")
    w4 = impls.random_w4(64, 16, 32, torch.Generator().manual_seed(0))
    x = torch.randn(1, 64)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    ref = impls.w4_int4pack(x, w4)          # eager first, as prefill: builds the layout
    fn = torch.compile(lambda x: impls.w4_int4pack(x, w4), backend=backend, fullgraph=True)
    got = fn(x)
    targets = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert "qdsl.int4pack_mm.default" in targets, targets
    assert not any("_weight_int4pack_mm_for_cpu" in t for t in targets), targets
    torch.testing.assert_close(got, ref)


def test_compiled_decode_attention_is_the_cpp_op_itself():
    """Where the C++ decode attention applies, a compiled step calls it directly (the
    key count read from cache_position in C++), not through the Python op around it;
    the logits are eager's."""
    from qdsl.runtime import attention
    if not attention._kernel_built():
        pytest.skip("qdsl's C++ kernels unavailable here (SDPA runs every step)")
    m, gm = _float_graph("llama")
    ids = tiny_ids(m, 1, 8)
    lm = GraphLM(gm, CACHE, compile_decode=False)
    lm.prefill(ids[:, :5])
    ref = lm.decode(int(ids[0, 5]))
    graphs = []

    def backend(g, example_inputs):
        graphs.append(g)
        return g

    lm.prefill(ids[:, :5])
    lm.step = torch.compile(gm, backend=backend, fullgraph=True)   # records the graph
    got = lm.decode(int(ids[0, 5]))
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    calls = [t for t in targets if t.startswith("qdsl_kernels.cached_decode_attention")]
    assert len(calls) == m.config.num_hidden_layers, targets
    assert not any("qdsl.cached_attention" in t for t in targets), targets
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_compiled_step_drops_the_size_asserts_unless_asked(monkeypatch):
    monkeypatch.delenv(compiled.CHECKS_ENV, raising=False)
    assert compiled._inductor_options() == {"size_asserts": False, "alignment_asserts": False}
    monkeypatch.setenv(compiled.CHECKS_ENV, "1")
    assert compiled._inductor_options() == {}


@pytest.mark.parametrize("recipe_file", ["w8a8_dynamic", "w4a8_dynamic"])
def test_fuse_siblings_runs_q_k_v_and_gate_up_as_one_call_each(recipe_file, tmp_path,
                                                               monkeypatch):
    """The decode step's graph copy: each layer's q / k / v and gate / up (one input, one
    activation spec) as one Int8DynamicLinears (W4DynamicLinears for w4a8) holding the
    same weights; the lowered graph is unchanged; eager logits identical (one kernel call
    is the separate calls side by side); the compiled step fuses them and matches eager."""
    from qdsl.runtime.int8 import Int8DynamicLinear, Int8DynamicLinears
    from qdsl.runtime.packed import W4DynamicLinear, W4DynamicLinears
    single, many = ((Int8DynamicLinear, Int8DynamicLinears) if recipe_file == "w8a8_dynamic"
                    else (W4DynamicLinear, W4DynamicLinears))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv(compiled.BACKEND_ENV, "aot_eager")
    recipe = (Path(__file__).parents[2] / "recipes" / "int8" / f"{recipe_file}.qrec").read_text()
    m = tiny("llama")
    q = C.compile(m, recipe, calib=tiny_ids(m, 2, 16), lower="int8", max_cache_len=CACHE,
                  progress=False)
    before = [n.format_node() for n in q.gm.graph.nodes]
    step, groups = compiled.fuse_siblings(q.gm)
    layers = m.config.num_hidden_layers
    assert groups == 2 * layers
    fused = [mod for mod in step.modules() if isinstance(mod, many)]
    assert sorted(len(f.members) for f in fused) == [2] * layers + [3] * layers
    calls = {n.target for n in step.graph.nodes if n.op == "call_module"}
    for f in fused:                                      # the same modules, not copies
        for member in f.members:
            assert any(q.gm.get_submodule(t) is member for t in
                       (n.target for n in q.gm.graph.nodes if n.op == "call_module"))
    left = [t for t in calls if type(step.get_submodule(t)) is single]
    assert len(left) == 2 * layers + 1                   # o_proj, down_proj, the head
    assert [n.format_node() for n in q.gm.graph.nodes] == before
    ids = tiny_ids(m, 1, 16, seed=5)
    ref = _steps(GraphLM(q.gm, CACHE, compile_decode=False), ids)
    fused_eager = _steps(GraphLM(step, CACHE, compile_decode=False), ids)
    if single is Int8DynamicLinear:        # integer sums: bit for bit
        assert torch.equal(fused_eager, ref)
    else:                                  # w4a8 sums its groups in float32: another order
        torch.testing.assert_close(fused_eager, ref, rtol=1e-4, atol=1e-4)
    lm = GraphLM(q.gm, CACHE, compile_decode=True)
    got = _steps(lm, ids)
    assert lm.step.failed is None and lm.step.fused == 2 * layers
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_a_failing_fuse_siblings_compiles_the_graph_as_lowered(monkeypatch, caplog):
    def broken(gm):
        raise RuntimeError("odd graph")
    monkeypatch.setattr(compiled, "fuse_siblings", broken)
    m, gm = _float_graph("llama")
    step = compiled.CompiledStep(gm, "tiny")
    with caplog.at_level(logging.WARNING, logger="qdsl.runtime.compiled"):
        assert step._step_graph() is gm
    assert step.fused == 0 and "odd graph" in caplog.text


@pytest.mark.slow
def test_cpp_wrapper_calls_qdsl_ops_through_their_c_shims(tmp_path, monkeypatch):
    """recipes/int8/w8a8_dynamic.qrec compiled with the C++ wrapper (the default where
    the extension is loaded): every GEMV and attention call of the step is a direct call
    of its C shim, and the logits and completions are eager's."""
    from qdsl.runtime import kernels
    from qdsl.runtime.int8 import Int8DynamicLinear, Int8DynamicLinears
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.delenv(compiled.WRAPPER_ENV, raising=False)
    if not kernels.table().ext:
        pytest.skip("qdsl's C++ kernels unavailable here")
    recipe = (Path(__file__).parents[2] / "recipes" / "int8" / "w8a8_dynamic.qrec").read_text()
    eager, lm, ids, ref, got = _int8_compiled_and_eager(recipe, seed=8)
    assert lm.step.failed is None and lm.step.wrapper == "cpp" and lm.step.direct
    step, _ = compiled.fuse_siblings(eager.gm)
    linears = sum(n.op == "call_module" and isinstance(
        step.get_submodule(n.target), (Int8DynamicLinear, Int8DynamicLinears))
        for n in step.graph.nodes)
    code = "".join(f.read_text() for f in (tmp_path / "inductor").rglob("*.cpp"))
    calls = {op: code.count(f"CHECK(aoti_torch_cpu_{op}(")
             for op in ("w8a8_linear", "w8a8_linear_cat", "cached_decode_attention")}
    layers = 2
    assert linears == 4 * layers + 1, linears      # qkv, o, gate/up, down; the head
    assert calls == {"w8a8_linear": 2 * layers + 1, "w8a8_linear_cat": 2 * layers,
                     "cached_decode_attention": layers}, calls
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))
    assert eager.greedy(ids[:, :5], 12) == lm.greedy(ids[:, :5], 12)


# a schema argument type -> the C parameters inductor passes for it (cpp_wrapper_cpu)
_C_PARAMS = {"Tensor": ["AtenTensorHandle"], "Optional[Tensor]": ["AtenTensorHandle*"],
             "List[Tensor]": ["const AtenTensorHandle*", "int64_t"],
             "List[Optional[Tensor]]": ["const AtenTensorHandle**", "int64_t"],
             "int": ["int64_t"], "float": ["double"], "bool": ["int32_t"]}


def test_c_shims_take_what_inductor_passes_for_each_op_schema():
    """Each C shim's parameters are, in order, what inductor's C++ wrapper passes for its
    op's schema (a mismatch is undefined behaviour at run time, not a compile error: the
    wrapper declares the shims from these strings), and every qdsl op a compiled decode
    step calls has one."""
    from qdsl.runtime import kernels
    if not kernels.table().ext:
        pytest.skip("qdsl's C++ kernels unavailable here")
    shims = compiled.c_shims()
    names = {op.name() for op in shims}
    assert names >= {f"qdsl_kernels::{n}" for n in ("w8a8_linear", "w8a8_linear_cat",
                                                      "cached_decode_attention", "w4a8_linear",
                                                      "w4a8_linear_cat")}
    for op, (decl,) in shims.items():
        params = decl[decl.index("(") + 1:decl.rindex(")")].split(", ")
        types = [p.rsplit(" ", 1)[0] for p in params]
        want = [c for a in op._schema.arguments for c in _C_PARAMS[str(a.type)]]
        assert types == want + ["AtenTensorHandle*"], (op.name(), types, want)
        assert decl.startswith(f"AOTITorchError aoti_torch_cpu_{op.name().split('::')[1]}(")
    # inductor's cache key pickles its config: the shims must pickle (by op name), or
    # every process compiles the C++ wrapper again; rebuilt from what they pickle to,
    # they are the same table
    from torch._inductor.codecache import FxGraphCachePickler
    rebuild, args = shims.__reduce__()
    assert rebuild(*args) == shims
    FxGraphCachePickler(torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())).dumps(shims)


def test_cpp_wrapper_switch(monkeypatch):
    from qdsl.runtime import kernels
    monkeypatch.setenv(compiled.WRAPPER_ENV, "0")
    assert not compiled.cpp_wrapper_wanted()
    monkeypatch.delenv(compiled.WRAPPER_ENV)
    assert compiled.cpp_wrapper_wanted() == bool(kernels.table().ext)
    assert compiled._wrapper_options(False) == {}
    assert compiled._wrapper_options(True)["cpp_wrapper"] is True


@pytest.mark.slow
def test_a_cpp_wrapper_that_fails_retries_with_the_python_one(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(compiled, "cpp_wrapper_wanted", lambda: True)
    real = compiled._wrapper_options

    def broken(cpp):
        if cpp:
            raise RuntimeError("no C++ wrapper today")
        return real(cpp)

    monkeypatch.setattr(compiled, "_wrapper_options", broken)
    m, gm = _float_graph("llama")
    ids = tiny_ids(m, 1, 16, seed=7)
    ref = _steps(GraphLM(gm, CACHE, compile_decode=False), ids)
    lm = GraphLM(gm, CACHE, compile_decode=True)
    with caplog.at_level(logging.WARNING, logger="qdsl.runtime.compiled"):
        got = _steps(lm, ids)
    assert "with the C++ wrapper failed" in caplog.text and "trying the Python wrapper" in caplog.text
    assert lm.step.failed is None and lm.step.wrapper == "python"
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
