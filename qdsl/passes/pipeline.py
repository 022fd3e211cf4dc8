"""One pass signature, one runner, named pipelines.

Every pass a pipeline runs is a ``Pass``: a name, a function ``(gm, ctx) -> gm`` and
the properties it ``requires`` and ``ensures`` (short names, checked by functions in
``PROPERTIES``). ``run(pipeline, gm, ctx)`` runs a list of passes in order: it logs
each with its wall time (INFO: ``qdsl -v`` shows it), refuses a pass whose
requirements do not hold (GraphError naming the pass and the property), and with
``check=True`` (tests) checks graph invariants after every pass (``check_graph``).

    ctx = PassContext(named, plan)
    gm = run(OBSERVE, captured.gm, ctx)      # ctx.observers
    ctx.feed = Feed(runner, windows)         # calibration data
    gm = run(CALIBRATE + FREEZE + lowering("int8"), gm, ctx)

The pass functions themselves (``lower_fake(gm, named, plan, frozen)`` ...) keep
their own signatures for direct use; the records below adapt them. A pass never
runs another pass: the pipeline lists both.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import fx

from ..errors import GraphError
from ..progress import Progress
from .calibrate import CalibrationCheckpoint, calibrate
from .common import ACT_PREFIX, WEIGHT_PREFIX, attr_name
from .freeze import Frozen, freeze
from .fuse_attention import fuse_attention
from .insert_observers import insert_observers
from .kv_cache import kv_cache
from .lower_fake import lower_fake
from .lower_int8 import INT8_PREFIX, lower_int8
from .record import insert_recorders
from .round_weights import STATS_PREFIX, insert_input_stats, round_weights
from .simplify import drop_noops
from .rotate import check_rotate, rotate
from .transform import collect_stats, smooth
from .validate import validate_plan

log = logging.getLogger(__name__)


@dataclass
class Feed:
    """Data a pass runs through the graph: ``run(batch)`` on each batch of ``windows``
    (a [N, T] tensor split into ``batch_size`` rows, or a sequence of [B, T] batches)."""

    run: Callable[[Any], object]
    windows: Any
    batch_size: int = 1
    progress: Progress = False
    checkpoint: tuple[str | Path, str] | None = None   # calibrate only: (path, header)


@dataclass
class PassContext:
    """What the passes of a pipeline read and leave for each other.

    ``named`` / ``plan``: the named graph and its plan (None only for pipelines of
    plan-free passes, e.g. ``FLOAT_RUNTIME``). ``observers``: set by
    ``insert_observers``; ``frozen``: set by ``freeze`` or given (an artifact's).
    ``fallback`` / ``lower_compute``: ``lower_int8``'s settings; ``kv_cache``: the
    key/value cache's dtype (``set lower.kv_cache``; None: float32). ``feed``: the data
    ``calibrate`` / ``record`` / ``feed_stats`` run through the graph; ``record_names``: the nodes
    ``insert_recorders`` records, ``recorders`` what it inserted. ``properties``:
    the names the passes run so far ensured (the runner adds them). ``stats`` /
    ``smooth``: the transforms' calibration statistics and SmoothQuant scales; a
    transform pass may replace ``named`` (a weight it untied)."""

    named: Any = None
    plan: Any = None
    frozen: Frozen | None = None
    observers: dict | None = None
    input_stats: dict | None = None   # insert_input_stats: GPTQ / AWQ recorders
    rounded: dict | None = None       # round_weights: GPTQ / AWQ codes for freeze
    progress: Progress = False
    fallback: str = "error"
    lower_compute: str | None = None
    kv_cache: str | None = None
    feed: Feed | None = None
    record_names: list[str] | None = None
    recorders: dict | None = None
    export: str | None = None  # `set export`: freeze rounds weight scales to fp16 for gguf
    properties: set[str] = field(default_factory=set)
    stats: dict | None = None    # collect_stats' modules (smooth's statistics)
    smooth: dict | None = None   # smooth's scales per producer, once computed


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
    "named": lambda gm, ctx: ctx.named is not None,
    "fed": lambda gm, ctx: ctx.feed is not None,
    "calibrated": _ran("calibrated"),
    "recording": lambda gm, ctx: ctx.recorders is not None,
    "validated": _ran("validated"),
    "observed": lambda gm, ctx: ctx.observers is not None,
    "input_stats": lambda gm, ctx: ctx.input_stats is not None,
    "weights_rounded": lambda gm, ctx: ctx.rounded is not None,
    "frozen": lambda gm, ctx: ctx.frozen is not None,
    "fake_lowered": _ran("fake_lowered"),
    "simplified": _ran("simplified"),
    "int8_lowered": _ran("int8_lowered"),
    "attention_fused": _ran("attention_fused"),
    "kv_cache_set": _ran("kv_cache_set"),
    "stats_collected": lambda gm, ctx: ctx.stats is not None,
    "stats_fed": _ran("stats_fed"),
    "smoothed": _ran("smoothed"),
    "rotated": _ran("rotated"),
}


# --------------------------------------------------------------------------- adapters

def _validate(gm, ctx):
    validate_plan(gm, ctx.named, ctx.plan)
    if "rotated" not in ctx.properties:
        check_rotate(gm, ctx.named, ctx.plan)   # explain reports a rotation that cannot fit
    return gm


def _rotate(gm, ctx):
    """Once per graph, like ``_smooth`` (deterministic: nothing stored)."""
    if "rotated" not in ctx.properties:
        ctx.named = rotate(gm, ctx.named, ctx.plan)
    return gm


def _observe(gm, ctx):
    ctx.observers = insert_observers(gm, ctx.named, ctx.plan)
    return gm


def _feed(gm, ctx):
    """Run ``ctx.feed`` through the graph (the recorders, or the observers)."""
    f = ctx.feed
    calibrate(f.run, f.windows, batch_size=f.batch_size, progress=f.progress)
    return gm


def _calibrate(gm, ctx):
    """``_feed`` for the observers and GPTQ / AWQ's input recorders; with neither (a
    dynamic-only recipe) it runs nothing and needs no data."""
    if not ctx.observers and not ctx.input_stats:
        return gm
    if ctx.feed is None:
        raise GraphError(f"pass calibrate: {len(ctx.observers or ())} static activation "
                         f"observers, {len(ctx.input_stats or ())} GPTQ / AWQ input recorders "
                         "and no calibration data (PassContext.feed)")
    f = ctx.feed
    ck = None
    if f.checkpoint is not None:   # (path, header): the observers' and recorders' state
        path, header = f.checkpoint
        modules: dict = {}
        seen: set[int] = set()
        for kind, found in (("observer", ctx.observers), ("input_stats", ctx.input_stats)):
            for name, m in (found or {}).items():   # (q / k / v share one recorder)
                if id(m) not in seen:
                    seen.add(id(m))
                    modules[f"{kind}:{name}"] = m
        ck = CalibrationCheckpoint(Path(path), modules, header)
    calibrate(f.run, f.windows, batch_size=f.batch_size, progress=f.progress, checkpoint=ck)
    return gm


def _record(gm, ctx):
    ctx.recorders = insert_recorders(gm, ctx.named, ctx.record_names, keep=True)
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
    ctx.frozen = freeze(gm, ctx.named, ctx.plan, ctx.observers, ctx.rounded,
                        export=ctx.export)
    ctx.frozen.smooth = dict(ctx.smooth or {})
    return gm


def _collect_stats(gm, ctx):
    ctx.stats = collect_stats(gm, ctx.named, ctx.plan)
    return gm


def _smooth(gm, ctx):
    """Once per graph: compile runs it in OBSERVE, load in the lowering (stored scales)."""
    if "smoothed" not in ctx.properties:
        stored = ctx.frozen.smooth if ctx.frozen is not None else None
        ctx.named, ctx.smooth = smooth(gm, ctx.named, ctx.plan, ctx.smooth or stored, ctx.stats)
        ctx.stats = None
    return gm


def _simplify(gm, ctx):
    keep = {n.node for n in ctx.named.nodes} if ctx.named is not None else frozenset()
    drop_noops(gm, keep=keep)
    return gm


def _fuse(gm, ctx):
    fuse_attention(gm)
    return gm


def _fuse_unplanned(gm, ctx):
    """Before calibration: fuse the attentions the plan quantizes nothing inside (their
    scores and probs stay float; a chain with a planned node stays eager for the
    lowering to find), so calibration runs what evaluation will."""
    keep = frozenset(n.node for n in ctx.named.nodes if ctx.plan[n.name].activation.quantized)
    fuse_attention(gm, keep)
    return gm


def _kv_cache(gm, ctx):
    """After an int8 lowering the cache is stored in the dtype; after fake, simulated."""
    kv_cache(gm, ctx.kv_cache, store="int8_lowered" in ctx.properties)
    return gm


VALIDATE_PLAN = Pass("validate_plan", _validate, ("planned",), ("validated",))
COLLECT_STATS = Pass("collect_stats", _collect_stats, ("planned", "validated"),
                     ("stats_collected",))
SMOOTH = Pass("smooth", _smooth, ("planned",), ("smoothed",))
ROTATE = Pass("rotate", _rotate, ("planned",), ("rotated",))
INSERT_OBSERVERS = Pass("insert_observers", _observe, ("planned", "validated"), ("observed",))
CALIBRATE_PASS = Pass("calibrate", _calibrate, ("observed",), ("calibrated",))
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
FUSE_UNPLANNED = Pass("fuse_unplanned_attention", _fuse_unplanned, ("planned", "observed"))
KV_CACHE_PASS = Pass("kv_cache", _kv_cache, ("fake_lowered",), ("kv_cache_set",))
INSERT_RECORDERS = Pass("insert_recorders", _record, ("named",), ("recording",))
RUN_RECORDERS = Pass("record", _feed, ("recording", "fed"), ("recorded",))
FEED_STATS = Pass("feed_stats", _feed, ("stats_collected", "fed"), ("stats_fed",))

# the named pipelines (compile: [STATISTICS when a recipe smooths], OBSERVE,
# CALIBRATE + FREEZE + lowering(lower); load: lowering(lower) with the artifact's
# frozen quantizers, re-applying stored transforms; the study's layer statistics:
# RECORD on a float or compiled graph, FEED for more windows)
VALIDATE = [VALIDATE_PLAN]
STATISTICS = [VALIDATE_PLAN, ROTATE, COLLECT_STATS, FEED_STATS]
# OBSERVE fuses the float attentions before calibration: the unfused generate graph
# attends over every cache slot (SmolLM2, 256-token windows, 1,024 slots: 1.49 -> 1.00 s
# a window)
OBSERVE = [VALIDATE_PLAN, ROTATE, SMOOTH, INSERT_OBSERVERS, INPUT_STATS, FUSE_UNPLANNED]
CALIBRATE = [CALIBRATE_PASS]
RECORD = [INSERT_RECORDERS, RUN_RECORDERS]
FEED = [RUN_RECORDERS]
FREEZE = [ROUND_WEIGHTS, FREEZE_PASS]
# fake fuses float attention too (since session 38): an unfused generate graph attends
# over every static-cache slot, which cost fake-quant evaluation 2-2.5x the float model's
FAKE = [ROTATE, SMOOTH, LOWER_FAKE, SIMPLIFY, FUSE_ATTENTION, KV_CACHE_PASS]
INT8 = [ROTATE, SMOOTH, LOWER_FAKE, SIMPLIFY, LOWER_INT8, FUSE_ATTENTION, KV_CACHE_PASS]
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
