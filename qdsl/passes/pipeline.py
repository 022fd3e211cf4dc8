"""One pass signature, one runner, named pipelines.

Every pass a pipeline runs is a ``Pass``: a name, a function ``(gm, ctx) -> gm`` and
the properties it ``requires`` and ``ensures`` (short names, checked by functions in
``PROPERTIES``). ``run(pipeline, gm, ctx)`` runs a list of passes in order: it logs
each with its wall time (INFO: ``qdsl -v`` shows it), refuses a pass whose
requirements do not hold (GraphError naming the pass and the property), and with
``check=True`` (tests) checks graph invariants after every pass (``check_graph``).

    ctx = PassContext(named, plan)
    gm = run(OBSERVE, captured.gm, ctx)      # ctx.observers
    ... calibrate ...
    gm = run(FREEZE + lowering("int8"), gm, ctx)

The pass functions themselves (``lower_fake(gm, named, plan, frozen)`` ...) keep
their own signatures for direct use; the records below adapt them. A pass never
runs another pass: the pipeline lists both.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import fx

from ..errors import GraphError
from .common import ACT_PREFIX, WEIGHT_PREFIX, attr_name
from .freeze import Frozen, freeze
from .fuse_attention import fuse_attention
from .insert_observers import insert_observers
from .lower_fake import lower_fake
from .lower_int8 import INT8_PREFIX, lower_int8
from .round_weights import STATS_PREFIX, insert_input_stats, round_weights
from .simplify import drop_noops
from .validate import validate_plan

log = logging.getLogger(__name__)


@dataclass
class PassContext:
    """What the passes of a pipeline read and leave for each other.

    ``named`` / ``plan``: the named graph and its plan (None only for pipelines of
    plan-free passes, e.g. ``FLOAT_RUNTIME``). ``observers``: set by
    ``insert_observers``; ``frozen``: set by ``freeze`` or given (an artifact's).
    ``fallback`` / ``lower_compute``: ``lower_int8``'s settings. ``properties``:
    the names the passes run so far ensured (the runner adds them)."""

    named: Any = None
    plan: Any = None
    frozen: Frozen | None = None
    observers: dict | None = None
    input_stats: dict | None = None   # insert_input_stats: GPTQ / AWQ recorders
    rounded: dict | None = None       # round_weights: GPTQ / AWQ codes for freeze
    progress: bool = False
    fallback: str = "error"
    lower_compute: str | None = None
    properties: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Pass:
    """A graph pass: ``fn(gm, ctx) -> gm``; ``requires`` / ``ensures`` are keys of
    ``PROPERTIES``."""

    name: str
    fn: Callable[[fx.GraphModule, PassContext], fx.GraphModule]
    requires: tuple[str, ...] = ()
    ensures: tuple[str, ...] = ()


def _ran(name: str) -> Callable[[fx.GraphModule, PassContext], bool]:
    return lambda gm, ctx: name in ctx.properties


# property -> does it hold for (gm, ctx)?
PROPERTIES: dict[str, Callable[[fx.GraphModule, PassContext], bool]] = {
    "planned": lambda gm, ctx: ctx.named is not None and ctx.plan is not None,
    "validated": _ran("validated"),
    "observed": lambda gm, ctx: ctx.observers is not None,
    "input_stats": lambda gm, ctx: ctx.input_stats is not None,
    "weights_rounded": lambda gm, ctx: ctx.rounded is not None,
    "frozen": lambda gm, ctx: ctx.frozen is not None,
    "fake_lowered": _ran("fake_lowered"),
    "simplified": _ran("simplified"),
    "int8_lowered": _ran("int8_lowered"),
    "attention_fused": _ran("attention_fused"),
}


# --------------------------------------------------------------------------- adapters

def _validate(gm, ctx):
    validate_plan(gm, ctx.named, ctx.plan)
    return gm


def _observe(gm, ctx):
    ctx.observers = insert_observers(gm, ctx.named, ctx.plan)
    return gm


def _input_stats(gm, ctx):
    ctx.input_stats = insert_input_stats(gm, ctx.named, ctx.plan)
    return gm


def _round(gm, ctx):
    ctx.rounded = round_weights(gm, ctx.named, ctx.plan, ctx.input_stats,
                                progress=ctx.progress)
    ctx.input_stats = {}  # the recorders are gone from the graph
    return gm


def _freeze(gm, ctx):
    ctx.frozen = freeze(gm, ctx.named, ctx.plan, ctx.observers, ctx.rounded)
    return gm


def _simplify(gm, ctx):
    keep = {n.node for n in ctx.named.nodes} if ctx.named is not None else frozenset()
    drop_noops(gm, keep=keep)
    return gm


def _fuse(gm, ctx):
    fuse_attention(gm)
    return gm


VALIDATE_PLAN = Pass("validate_plan", _validate, ("planned",), ("validated",))
INSERT_OBSERVERS = Pass("insert_observers", _observe, ("planned", "validated"), ("observed",))
INPUT_STATS = Pass("insert_input_stats", _input_stats, ("planned", "validated"),
                   ("input_stats",))
ROUND_WEIGHTS = Pass("round_weights", _round, ("planned", "input_stats"), ("weights_rounded",))
FREEZE_PASS = Pass("freeze", _freeze, ("planned", "observed", "weights_rounded"), ("frozen",))
LOWER_FAKE = Pass("lower_fake", lambda gm, ctx: lower_fake(gm, ctx.named, ctx.plan, ctx.frozen),
                  ("planned", "frozen"), ("fake_lowered",))
SIMPLIFY = Pass("drop_noops", _simplify, (), ("simplified",))
LOWER_INT8 = Pass("lower_int8", lambda gm, ctx: lower_int8(
    gm, ctx.named, ctx.plan, ctx.frozen, fallback=ctx.fallback, compute=ctx.lower_compute),
    ("planned", "frozen", "fake_lowered"), ("int8_lowered",))
FUSE_ATTENTION = Pass("fuse_attention", _fuse, (), ("attention_fused",))

# the named pipelines (compile: OBSERVE, calibrate, FREEZE + lowering(lower);
# load: lowering(lower) with the artifact's frozen quantizers)
VALIDATE = [VALIDATE_PLAN]
OBSERVE = [VALIDATE_PLAN, INSERT_OBSERVERS, INPUT_STATS]
FREEZE = [ROUND_WEIGHTS, FREEZE_PASS]
FAKE = [LOWER_FAKE, SIMPLIFY]
INT8 = FAKE + [LOWER_INT8, FUSE_ATTENTION]
FLOAT_RUNTIME = [SIMPLIFY, FUSE_ATTENTION]   # a float graph run as an int8 artifact runs
LOWERINGS = {"fake": FAKE, "int8": INT8}


def lowering(lower: str) -> list[Pass]:
    """The pipeline of ``--lower`` mode ``lower`` ("fake" or "int8")."""
    try:
        return LOWERINGS[lower]
    except KeyError:
        raise ValueError(f"lower must be one of {sorted(LOWERINGS)}, got {lower!r}") from None


# --------------------------------------------------------------------------- the runner

def run(pipeline: list[Pass], gm: fx.GraphModule, ctx: PassContext, *,
        check: bool = False) -> fx.GraphModule:
    """Run ``pipeline``'s passes in order on ``gm`` -> the rewritten graph.

    requires: ``ctx`` carries what the first pass needs (``named``/``plan``, ...).
    guarantees: each pass ran only after its ``requires`` held (else GraphError
    naming the pass and the property, nothing more run); its ``ensures`` are added
    to ``ctx.properties``; each pass is logged at INFO with its wall time. With
    ``check``: ``check_graph`` after every pass, a failure naming the pass that
    broke the graph and the passes run before it."""
    done: list[str] = []
    for p in pipeline:
        missing = [r for r in p.requires if not PROPERTIES[r](gm, ctx)]
        if missing:
            raise GraphError(f"pass {p.name} requires {', '.join(missing)}, which does not "
                             f"hold (passes run: {', '.join(done) or 'none'})",
                             hint="run the passes ensuring it first (see qdsl.passes.pipeline)")
        t0 = time.perf_counter()
        gm = p.fn(gm, ctx)
        log.info("pass %s: %.1f ms", p.name, (time.perf_counter() - t0) * 1e3)
        ctx.properties.update(p.ensures)
        if check:
            try:
                check_graph(gm, ctx)
            except GraphError as e:
                raise GraphError(f"pass {p.name} broke the graph (after "
                                 f"{', '.join(done) or 'no other pass'}): {e}",
                                 node=e.node) from e
        done.append(p.name)
    return gm


def check_graph(gm: fx.GraphModule, ctx: PassContext) -> None:
    """Graph invariants (GraphError naming what is wrong): ``gm.graph.lint()`` passes;
    every get_attr / call_module target exists; every observer sits in the graph
    until freezing; after ``lower_fake`` every frozen activation quantizer and fake
    weight is in place, and after ``lower_int8`` each frozen weight is an int8
    module or a recorded fallback still reading its fake weight."""
    try:
        gm.graph.lint()
    except Exception as e:  # fx raises RuntimeError / AssertionError
        raise GraphError(f"graph lint failed: {e}") from None
    for n in gm.graph.nodes:
        if n.op in ("get_attr", "call_module") and not _has(gm, n.target):
            raise GraphError(f"{n.op} {n.name} reads {n.target}, which the module does not have",
                             node=n.name)
    modules = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    attrs = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    if ctx.observers is not None and ctx.frozen is None:
        for name in ctx.observers:
            if attr_name(name, ACT_PREFIX) not in modules:
                raise GraphError(f"the observer of {name} is not in the graph", node=name)
        for name, mod in (ctx.input_stats or {}).items():
            if not any(gm.get_submodule(t) is mod for t in modules if t.startswith(STATS_PREFIX)):
                raise GraphError(f"the input recorder of {name} is not in the graph", node=name)
    if ctx.frozen is None or "fake_lowered" not in ctx.properties:
        return
    int8 = "int8_lowered" in ctx.properties
    fallbacks = {f["node"] for f in getattr(gm, "meta", {}).get("qdsl_fallbacks", [])}
    for name in ctx.frozen.activations:
        if not int8 and attr_name(name, ACT_PREFIX) not in modules:
            raise GraphError(f"the activation quantizer of {name} is not in the graph", node=name)
    for name in ctx.frozen.weights:
        fake = attr_name(name, WEIGHT_PREFIX) in attrs
        lowered = attr_name(name, INT8_PREFIX) in modules
        if not (lowered or fake) or (int8 and not lowered and name not in fallbacks):
            raise GraphError(f"the weight quantizer of {name} is not in the graph", node=name)


def _has(gm: fx.GraphModule, target: str) -> bool:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return False
    return True
