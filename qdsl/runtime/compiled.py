"""The decode step of a captured graph compiled with inductor (issue 15, "decode at the
bandwidth limit"): ``GraphLM`` runs its one-token forwards through ``CompiledStep``.

A decode step is ~1,900 small graph ops (norms, rotary slices, per-token activation
quantization, cache bookkeeping) around ~200 GEMVs; eager, their dispatch costs more
than the GEMVs' weight reads. ``torch.compile`` (inductor, C++ on CPU) fuses them into
a few loops, as gpt-fast does:

* **static shapes** (``dynamic=False``): one token, the cache of ``max_cache_len``
  slots updated in place (the graph's ``index_copy_``); ``FusedAttention`` becomes
  one opaque op that reads only the filled part of the cache at run time, so the
  compiled graph has no data-dependent shape: qdsl's C++
  ``qdsl_kernels::cached_decode_attention`` (the key count read from
  ``cache_position`` in C++) where it applies, decided while tracing, else the Python
  op ``qdsl::cached_attention`` (SDPA over a slice);
* qdsl's C++ kernels stay **opaque ops** (``torch.ops.qdsl_kernels.*``, fake
  impls in ``kernels/cext.py``); the kernel table's choice is a constant to the
  tracer (``kernels.choose``, ``impls._isa``);
* **cached**: inductor's compiled code goes to ``<qdsl cache>/inductor``
  (``TORCHINDUCTOR_CACHE_DIR`` where set), so a second process skips the C++ build
  (it still traces the graph);
* **no guards on module state** (``_guard_options``): checking them cost ~10% of a step;
* **sibling linears fused** (``fuse_siblings``, on a copy of the graph: the lowered
  graph itself is unchanged): a layer's q / k / v and gate / up quantize their shared
  input once and run as one GEMV call (``qdsl_kernels::w8a8_linear_cat``, or
  ``w4a8_linear_cat`` for w4a8 linears);
* **no size asserts** (``_inductor_options``): the generated wrapper checks every
  input's and every opaque op's output shape and strides (~800 checks a SmolLM2 step,
  6% of it); the shapes are static and the fake impls are tested with the checks on
  (``$QDSL_COMPILE_CHECKS=1`` turns them on);
* **no dynamo frame per step** (``_Capture``): after the first call (dynamo traces the
  step once, the backend compiles it), later steps call the compiled graph directly with
  the graph's inputs in the order the backend was given them (the module's parameters
  and buffers as they are, the step's tensors in their slots), skipping dynamo's guard
  check, cache lookup and input flattening (SmolLM2, paired A/B of 62 blocks: w4a8
  0.914x [0.902, 0.927] at 1 thread, 0.862x at 2, 0.931x under forced AVX2; w8a8
  0.943x [0.939, 0.947]). The first
  call checks that the direct call returns what dynamo's did; a call with other input
  names or shapes goes through dynamo (``QDSL_COMPILE_DIRECT=0``: always);
* **weights and caches on huge pages** (``hugepages.rehome``, before compiling): one
  buffer advised ``MADV_HUGEPAGE`` in the order the graph reads it, so the step's
  streams do not stop at every 4 KiB page (``$QDSL_HUGE_PAGES=0``: left where they are);
* **a C++ wrapper** (inductor's ``cpp_wrapper``): the step's op calls, buffer
  reinterpretations and fused loops run from generated C++ instead of a Python function
  (~150 op calls and hundreds of views a SmolLM2 step), qdsl's ops called through their
  C entry points (``kernels/qdsl_shims.cpp``, ``c_shims``); without those inductor's C++
  wrapper looks each custom op up by name and boxes its arguments, which was slower than
  the Python wrapper. SmolLM2 w8a8 (fp16 cache), paired A/B of 62 blocks in one process:
  0.901x [0.894, 0.907] of a step at 1 thread, 0.887x [0.873, 0.900] at 2, 0.894x
  [0.889, 0.899] under forced AVX2;
  logits identical. Compiling it takes ~44 s the first time (SmolLM2; the Python
  wrapper ~14 s), then comes from inductor's cache like the Python one (``_Shims``
  pickles the shim table by op name, so the cache key can be computed). On by default
  where qdsl's extension is loaded
  (``$QDSL_CPP_WRAPPER=0``: the Python wrapper); a C++ wrapper that fails to compile is
  retried with the Python one;
* **eager fallback**: where compiling fails the step runs eager, said once (a
  warning naming the error); ``QDSL_COMPILE_DECODE=0`` never compiles.

``QDSL_COMPILE_BACKEND`` picks another torch.compile backend (``aot_eager``: traced
through the fake impls without generating code; tests of the plumbing use it).

Prefill (T > 1) stays eager: its GEMMs dominate and each prompt length would be a
new static shape.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import logging
import operator
import os
import re
import time

import torch
from torch._inductor.compile_fx import compile_fx
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from ..models import zoo
from . import hugepages
from .int8 import Int8DynamicLinears
from .kernels import cext
from .packed import W4DynamicLinears

log = logging.getLogger(__name__)

ENV = "QDSL_COMPILE_DECODE"     # 1: compile the decode step, 0: never; unset: the caller's choice
CHECKS_ENV = "QDSL_COMPILE_CHECKS"   # 1: keep inductor's size / alignment asserts
SIBLINGS_ENV = "QDSL_FUSE_SIBLINGS"  # 0: compile the graph as lowered (no fuse_siblings)
BACKEND_ENV = "QDSL_COMPILE_BACKEND"   # default inductor
DIRECT_ENV = "QDSL_COMPILE_DIRECT"     # 0: every step through dynamo's frame (no _Capture)
WRAPPER_ENV = "QDSL_CPP_WRAPPER"       # 0: inductor's Python wrapper (default: C++ with shims)


def wanted(default: bool = False) -> bool:
    """Whether to compile the decode step: ``$QDSL_COMPILE_DECODE`` if set, else ``default``."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("", "auto"):
        return default
    return value not in ("0", "false", "no", "off")


def _cache_dir() -> None:
    """Inductor's cache under the qdsl cache dir, unless the user chose one (importing
    torch already sets the variable to torch's default, /tmp/torchinductor_USER)."""
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not current or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(zoo.cache_dir() / "inductor")


def _guard_options() -> dict:
    """No guards on the graph module's state: checking them (every parameter and buffer
    of ~200 modules) took 1.6 ms of a ~15 ms SmolLM2 int8 step (profiled, torch 2.13),
    against 0.17 ms without. Safe here: a step is bound to one graph whose modules and
    weights are fixed once loaded (the cache is updated in place, not replaced)."""
    skip = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
    return {"guard_filter_fn": skip} if skip is not None else {}


def _inductor_options() -> dict:
    """Inductor's shape, stride and alignment asserts off (unless ``$QDSL_COMPILE_CHECKS``
    is 1): the generated wrapper ran ~800 of them a SmolLM2 int8 step (0.7 us each);
    without them the step took 0.936x, 95% CI [0.921, 0.950] (62 paired blocks of 4
    steps, AVX512, 1 thread; an A/A run of the same design: 1.000 [0.987, 1.014]). The
    graph's shapes are static and the opaque ops' fake impls are tested with the
    asserts on."""
    if os.environ.get(CHECKS_ENV, "").strip() == "1":
        return {}
    return {"size_asserts": False, "alignment_asserts": False}


def _shims_named(items: tuple) -> "_Shims":
    """``_Shims`` from (op name, declarations) pairs: how one is unpickled."""
    return _Shims({getattr(torch.ops.qdsl_kernels, name.split("::")[1]).default: list(decls)
                   for name, decls in items})


class _Shims(dict):
    """``custom_ops_to_c_shims``'s dict (op overload -> declarations) that pickles by op
    name: inductor's cache key pickles its config, and an op overload does not pickle
    (the key then fails and every process compiled the C++ wrapper again: ~40 s)."""

    def __reduce__(self):
        return _shims_named, (tuple(sorted((op.name(), tuple(d)) for op, d in self.items())),)


@functools.cache
def c_shims() -> dict:
    """qdsl's ops with a C entry point (``kernels/qdsl_shims.cpp``) -> its declaration, for
    inductor's ``aot_inductor.custom_ops_to_c_shims``: the C++ wrapper then calls them
    directly. Read from the source, so the declarations are the definitions' own; {} where
    the extension is not loaded."""
    if not cext.load():
        return {}
    # torch loads op libraries RTLD_LOCAL; the wrapper's .so resolves the shims at load
    # time, so they must be global (dlopen again: promotes the loaded library)
    for path in torch.ops.loaded_libraries:
        if cext.NAME in os.path.basename(path):
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    found = re.findall(r"AOTI_TORCH_EXPORT AOTITorchError (aoti_torch_cpu_(\w+))\(([^)]*)\)",
                       cext.SHIMS.read_text())
    return _shims_named(tuple((f"qdsl_kernels::{op}",
                               (f"AOTITorchError {fn}({' '.join(params.split())})",))
                              for fn, op, params in found))


def cpp_wrapper_wanted() -> bool:
    """Whether to compile with inductor's C++ wrapper: unless ``$QDSL_CPP_WRAPPER`` is 0,
    where qdsl's ops have their C shims (without them it is slower than Python's)."""
    if os.environ.get(WRAPPER_ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return False
    return bool(c_shims())


def _wrapper_options(cpp: bool) -> dict:
    """Inductor's C++ wrapper, qdsl's ops called through their C shims (``cpp``), else
    its Python wrapper."""
    if not cpp:
        return {}
    return {"cpp_wrapper": True, "aot_inductor.custom_ops_to_c_shims": c_shims()}


# a runtime module type -> the module running several of them (same ``sibling_key()``)
# on one input
SIBLINGS = {c.MEMBER: c for c in (Int8DynamicLinears, W4DynamicLinears)}


def fuse_siblings(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, int]:
    """A copy of ``gm`` (its modules shared, not copied) where the ``Int8DynamicLinear``
    (or ``W4DynamicLinear``) siblings of each input (same activation spec, and group
    size: a layer's q / k / v, gate / up) run as one ``Int8DynamicLinears``
    (``W4DynamicLinears``): one quantization of the input and one GEMV call instead of
    two or three (SmolLM2: 211 -> 121 calls a step). ``gm`` is unchanged (prefill,
    saving and export see the graph as lowered). -> (copy, groups fused)."""
    graph = torch.fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    graph.output(graph.graph_copy(gm.graph, {}))
    step = torch.fx.GraphModule(gm, graph)
    order = {n: i for i, n in enumerate(graph.nodes)}    # members are original nodes
    groups = 0
    for node in list(graph.nodes):
        siblings: dict[object, list[torch.fx.Node]] = {}
        for user in node.users:
            if user.op != "call_module" or user.args != (node,) or user.kwargs:
                continue
            m = step.get_submodule(user.target)
            if type(m) in SIBLINGS:
                siblings.setdefault((type(m), m.sibling_key()), []).append(user)
        for (kind, _), members in siblings.items():
            if len(members) < 2:
                continue
            members.sort(key=order.__getitem__)
            name = f"qdsl_siblings_{groups}"
            step.add_submodule(name, SIBLINGS[kind](
                [step.get_submodule(u.target) for u in members]))
            with graph.inserting_before(members[0]):
                fused = graph.call_module(name, (node,))
                for i, u in enumerate(members):
                    out = graph.call_function(operator.getitem, (fused, i))
                    out.meta = dict(u.meta)
                    u.replace_all_uses_with(out)
            for u in members:
                graph.erase_node(u)
            groups += 1
    graph.lint()
    step.recompile()
    return step, groups


class _Capture:
    """A torch.compile backend that keeps what it compiled: the graph's compiled callable
    and the inputs it was compiled with, in the graph's order (``bind`` then maps the
    step's tensors to their slots, so later calls skip dynamo's frame)."""

    def __init__(self, backend: str, cpp_wrapper: bool = False) -> None:
        self.backend, self.cpp_wrapper = backend, cpp_wrapper
        self.fn = None
        self.example: list | None = None
        self.calls = 0                      # graphs compiled (one with fullgraph=True)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list):
        self.calls += 1
        self.example = list(example_inputs)
        if self.backend == "inductor":
            self.fn = compile_fx(gm, example_inputs,
                                 config_patches={**_inductor_options(),
                                                 **_wrapper_options(self.cpp_wrapper)})
        else:
            self.fn = torch._dynamo.lookup_backend(self.backend)(gm, example_inputs)
        return self.fn

    def bind(self, inputs: dict[str, torch.Tensor], boxed: bool):
        """A ``direct(**inputs)`` calling the compiled graph itself (``boxed``: with one
        list of the inputs, else with them as arguments), or None where the inputs
        cannot be placed (not one graph, a step tensor missing or given twice)."""
        if self.calls != 1 or self.fn is None or self.example is None:
            return None
        names = {id(t): k for k, t in inputs.items()}
        if len(names) != len(inputs):
            return None
        named = [(i, names[id(t)]) for i, t in enumerate(self.example) if id(t) in names]
        if sorted(k for _, k in named) != sorted(inputs):
            return None
        fn, template = self.fn, [None if id(t) in names else t for t in self.example]

        def direct(**kw: torch.Tensor):       # per step: only the step's tensors placed
            args = template.copy()
            for i, k in named:
                args[i] = kw[k]
            return fn(args) if boxed else fn(*args)
        return direct


class CompiledStep:
    """``gm(**inputs)`` for one fixed input shape, compiled on the first call.

    ``compile_s``: seconds the first call took (tracing + compiling + one step), None
    before it; ``failed``: why compiling failed (the step then runs eager), else None;
    ``fused``: the sibling groups ``fuse_siblings`` fused in the compiled graph
    (``$QDSL_FUSE_SIBLINGS=0``: none); ``direct``: whether steps after the first call
    call the compiled graph without dynamo's frame; ``moved``: the graph's tensors
    ``hugepages.rehome`` put on huge pages before compiling (``$QDSL_HUGE_PAGES=0``:
    none); ``wrapper``: "cpp" or "python", the wrapper inductor generated (None before
    the first call, or eager).
    """

    def __init__(self, gm: torch.nn.Module, name: str = "graph") -> None:
        self.gm, self.name = gm, name
        self.compile_s: float | None = None
        self.failed: str | None = None
        self.fused = 0
        self.moved = hugepages.Moved()   # what went onto huge pages (first call)
        self.wrapper: str | None = None
        self._fn = None
        self._direct = None           # the compiled graph without dynamo's frame
        self._bound: tuple | None = None   # the input names / shapes / dtypes it takes

    def _step_graph(self) -> torch.nn.Module:
        if (not isinstance(self.gm, torch.fx.GraphModule)
                or os.environ.get(SIBLINGS_ENV, "").strip() == "0"):
            return self.gm
        try:
            step, self.fused = fuse_siblings(self.gm)
        except Exception as e:  # noqa: BLE001 - an optimisation: compile the graph as it is
            log.warning("fuse_siblings failed on %s (%s: %s); compiling the graph as "
                        "lowered", self.name, type(e).__name__, e)
            return self.gm
        return step if self.fused else self.gm

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        if self.failed is not None:
            return self.gm(**inputs)
        if self._direct is not None and self._signature(inputs) == self._bound:
            return self._direct(**inputs)[0]
        if self._fn is not None:
            return self._fn(**inputs)
        _cache_dir()
        backend = os.environ.get(BACKEND_ENV) or "inductor"
        t0 = time.perf_counter()
        if hugepages.wanted():   # before compiling: the compiled graph binds these tensors
            with torch.inference_mode(False), torch.no_grad():
                self.moved = hugepages.rehome(self.gm)
        step = self._step_graph()
        tries = [True, False] if backend == "inductor" and cpp_wrapper_wanted() else [False]
        for cpp in tries:
            capture = _Capture(backend, cpp_wrapper=cpp)
            try:
                fn = torch.compile(step, backend=capture, dynamic=False, fullgraph=True,
                                   options=_guard_options() or None)
                out = fn(**inputs)
                break
            except Exception as e:  # noqa: BLE001 - any compile failure means "run eager"
                text = str(e).strip().splitlines()
                why = f"{type(e).__name__}: {text[0][:300] if text else ''}"
                if cpp and len(tries) > 1:
                    log.warning("compiling the decode step of %s with the C++ wrapper failed "
                                "(%s); trying the Python wrapper", self.name, why)
                    torch._dynamo.reset()   # the failed try's frame stays cached otherwise
                    continue
                self.failed = why
                log.warning("compiling the decode step of %s failed (%s); decoding eager",
                            self.name, self.failed)
                # the cache writes of this position are idempotent: the eager step rewrites
                return self.gm(**inputs)
        self.compile_s = time.perf_counter() - t0
        self._fn = fn
        self.wrapper = ("cpp" if capture.cpp_wrapper else "python") \
            if backend == "inductor" else None
        self._bind(capture, inputs, out)
        log.info("compiled the decode step of %s in %.1f s (%s wrapper)", self.name,
                 self.compile_s, self.wrapper or backend)
        return out

    @staticmethod
    def _signature(inputs: dict[str, torch.Tensor]) -> tuple:
        return tuple((k, tuple(t.shape), t.dtype) for k, t in sorted(inputs.items()))

    def _bind(self, capture: _Capture, inputs: dict[str, torch.Tensor], out) -> None:
        """Later steps call the compiled graph directly where it returns, for these
        inputs, exactly what dynamo's call did (run again: this position's cache writes
        are idempotent); else they keep going through dynamo."""
        if os.environ.get(DIRECT_ENV, "").strip() == "0" or not isinstance(out, torch.Tensor):
            return
        errors = []
        for boxed in (False, True):     # the backends' callables differ; try both ways
            try:
                direct = capture.bind(inputs, boxed)
                if direct is None:
                    break
                again = direct(**inputs)
            except Exception as e:  # noqa: BLE001 - an optimisation: keep dynamo's call
                errors.append(f"{type(e).__name__}: {e}")
                continue
            if (isinstance(again, (tuple, list)) and len(again) == 1
                    and isinstance(again[0], torch.Tensor) and torch.equal(again[0], out)):
                self._direct, self._bound = direct, self._signature(inputs)
                return
        log.info("%s's compiled step is called through dynamo (%s)", self.name,
                 "; ".join(errors) or "its direct call returned something else")

    @property
    def direct(self) -> bool:
        return self._direct is not None
