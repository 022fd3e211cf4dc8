"""``qdsl compile --stream``: calibrate and freeze one block at a time, the float model
never whole in memory (the sequential pipeline of llm-compressor and GPTQ).

    config.json --skeleton--> capture --name, plan--> OBSERVE (the same passes)
    calibration windows --stage by stage (compiler.stages)-->
        for the embedding, block 0 ... N-1, the head:
            read its parameters from the checkpoint (compiler.checkpoint)
            run every window through it (its observers and GPTQ / AWQ recorders see them)
            round its GPTQ / AWQ weights (passes.round_weights.round_sites), free
            their statistics
            freeze its nodes (passes.freeze) and free its parameters
    the frozen quantizers --QuantizedModel.save--> OUT (what the in-memory compile writes)

The graph, names and plan are those of the in-memory ``compile`` (the same capture of
the same architecture); each block's inputs are its float inputs, as in the in-memory
calibration (observers return their input unchanged), computed by the same aten ops
on the same values; so the artifact is byte-identical (``tests/test_stream.py``,
``tests/test_stream_rounding.py``; docs/scale.md). GPTQ / AWQ statistics are the float
inputs too, as in memory (not re-run on earlier blocks' rounded weights); only one
stage's statistics are alive at a time. Needs what the whole graph would not: nothing
rotates or smooths (they move weights across blocks), ``--lower fake``, no
``student.blocks``; each is refused, naming the rule, before any data is read.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace

import torch

from ..config.recipe import Recipe, Settings
from ..errors import Diagnostic, ModelError, RecipeError
from ..graph.attrs import param, set_tensor
from ..graph.capture import capture
from ..graph.naming import name_graph
from ..passes.common import remove_inserted
from ..passes.freeze import Frozen, freeze, stored_codes
from ..passes.pipeline import OBSERVE, PassContext, run
from ..passes.round_weights import (STATS_PREFIX, linear_input, recorder_users, round_sites,
                                    rounding_sites)
from ..plan import build_plan
from ..progress import Progress
from .build import (QuantizedModel, as_recipe, calibration_data, fit_lengths, is_causal_lm)
from .checkpoint import Checkpoint, open_checkpoint
from .exportcheck import export_diagnostics, export_verdicts
from .memtrace import MemTrace, trim_heap
from .stages import Stages

log = logging.getLogger(__name__)


def compile_stream(model: str | os.PathLike, recipe: Recipe | str, out: str | os.PathLike,
                   calib=None, *, settings: Settings | None = None, lower: str | None = None,
                   max_cache_len: int | None = None, progress: Progress = True,
                   force: bool = False, trace_memory: str | os.PathLike | None = None
                   ) -> QuantizedModel:
    """``compile(model, recipe, calib, ...).save(out)``, streamed: ``model`` is a
    checkpoint (short name, directory or hub id) read one block at a time. Returns the
    saved model's description (a ``QuantizedModel`` whose graph holds meta tensors:
    its plan, frozen quantizers and settings; run it with ``qdsl.load(out)``).
    ``trace_memory``: a file for the resident memory at each step (``compiler.memtrace``)."""
    tr = MemTrace(trace_memory)
    try:
        return _compile_stream(model, recipe, out, calib, settings, lower, max_cache_len,
                               progress, force, tr)
    finally:
        tr.close()


def _compile_stream(model, recipe, out, calib, settings, lower, max_cache_len, progress,
                    force, tr: MemTrace) -> QuantizedModel:
    tr.mark("start")
    r = as_recipe(recipe)
    st = r.settings.then(settings or Settings())
    lower = lower or st.lower or "fake"
    _refuse_settings(r, st, lower)
    ck = open_checkpoint(str(model))
    tr.mark("skeleton")
    m = ck.model
    mode = "generate" if is_causal_lm(m) else "plain"
    max_cache_len, takes = fit_lengths(m, mode, st, max_cache_len)
    captured = capture(m, mode=mode, max_cache_len=max_cache_len)
    gm, strip = captured.gm, captured.module_path
    lazy = _to_meta(gm, strip, ck)   # the never-touched CPU parameters go
    del captured
    tr.mark("capture")
    named = name_graph(SimpleNamespace(gm=gm, module_path=strip))
    plan = build_plan(r, named)
    _refuse_plan(r, plan)
    if st.export:
        errors = export_diagnostics(export_verdicts(gm, named, plan, st.export), plan,
                                    st.export, r.text or "", r.source)
        if errors:
            raise RecipeError(errors)
    tr.mark("plan")
    source_hash = ck.source_hash()
    trim_heap()
    tr.mark("source hash")
    ctx = PassContext(named, plan, export=st.export, progress=progress)
    run(OBSERVE, gm, ctx)
    tr.mark("observe passes")
    frozen = _calibrate_and_freeze(gm, strip, ck, lazy, named, plan, ctx, r, st, mode,
                                   takes, calib, progress, trace=tr)
    tr.mark("merge")
    qm = QuantizedModel(gm, named=named, plan=plan, recipe=r, frozen=frozen, lower=lower,
                        mode=mode, max_cache_len=max_cache_len, source_id=str(model),
                        source_hash=source_hash, settings=st, tokenizer=ck.tokenizer,
                        model_config=getattr(m, "config", None), fallback="error")
    qm.save(out, force=force)
    tr.mark("save")
    return qm


def _calibrate_and_freeze(gm, strip, ck: Checkpoint, lazy: dict[str, str], named, plan,
                          ctx: PassContext, r: Recipe, st: Settings, mode: str, takes, calib,
                          progress: Progress, trace: MemTrace | None = None) -> Frozen:
    tr = trace or MemTrace(None)
    stages = Stages(gm, strip)
    fx_nodes = {n.name: n for n in gm.graph.nodes}
    by_stage: dict[int, list] = {}
    for node in named.nodes:   # (a fused attention's float scores / probs are gone)
        if node.node in fx_nodes:
            by_stage.setdefault(stages.stage[fx_nodes[node.node]], []).append(node)
    observers = ctx.observers or {}
    stats = ctx.input_stats or {}
    sites: dict[int, list] = {}   # GPTQ / AWQ sites by the stage of the linear reading them
    for node in rounding_sites(named, plan):
        sites.setdefault(stages.stage[linear_input(gm, node)[0]], []).append(node)
    users = recorder_users([n for s in sites.values() for n in s], stats)
    batches = []
    if observers or stats:
        windows = calibration_data(calib, st, ck.tokenizer, takes,
                                   f"quantizes {len(observers)} activations statically"
                                   if observers else
                                   f"rounds {len(stats)} weights with GPTQ / AWQ")
        if mode == "generate":   # GraphLM.logits: one window per forward, from position 0
            batches = [{"input_ids": w[None], "cache_position": torch.arange(w.shape[0])}
                       for w in windows]
        else:
            batches = [{"input_ids": b} for b in windows.split(st.calib_batch_size or 8)]
        tr.mark("calibration data")
    parts: list[Frozen] = []
    loaded: list[str] = []

    def materialise(targets):
        for t in targets:
            if t in lazy and t not in loaded:
                set_tensor(gm, t, ck.tensor(lazy[t]))
                loaded.append(t)

    def label(stage: int) -> str:
        return ("embedding" if stage < 0 else "head" if stage == stages.blocks
                else f"block {stage}")

    def before(stage: int) -> None:
        if batches:
            materialise(stages.params(stage))
            tr.mark(f"{label(stage)} load")

    def after(stage: int) -> None:
        if batches:
            tr.mark(f"{label(stage)} run")
        nodes = by_stage.get(stage, [])
        materialise([n.weight for n in nodes if n.weight]
                    + [n.weight for n in sites.get(stage, ())])
        # this stage's recorders are complete: round its weights, free their statistics
        rounded = round_sites(gm, sites.get(stage, []), plan, stats, users, progress=False)
        part = freeze(gm, SimpleNamespace(nodes=tuple(nodes)), plan,
                      {n.name: observers[n.name] for n in nodes if n.name in observers},
                      rounded, export=st.export, codes=False)  # the fake artifact stores scales
        part.codes = {k: stored_codes(q) for k, q in part.codes.items()}  # GPTQ's / AWQ's,
        parts.append(part)          # as the artifact stores them (int8 for <= 8 bits)
        del rounded
        tr.mark(f"{label(stage)} freeze")
        for t in loaded:    # free the stage's parameters before the next loads
            set_tensor(gm, t, _meta_like(gm, t))
        loaded.clear()
        for n in nodes:     # an observer's statistics are no longer needed; the graph
            _release(observers.pop(n.name, None))   # still holds it: empty its buffers
        trim_heap()   # the freed stage's pages back to the kernel (docs/scale.md)
        tr.mark(f"{label(stage)} free")
        log.info("stream: stage %s frozen (%d nodes)", stage, len(nodes))

    if batches:
        stages.run(batches, progress=progress, before=before, after=after)
    else:   # nothing to calibrate: freeze the weights stage by stage
        for stage in stages.order:
            after(stage)
    if stats:   # as round_weights leaves the in-memory graph: each op reads its input
        remove_inserted(gm, STATS_PREFIX)
        ctx.input_stats = {}
    return _merge(parts, named)


def _release(observer) -> None:
    """Empty a frozen observer's buffers (an MSE observer's sample and keys: 1 MiB
    each, four observers a Qwen block); the frozen module holds its own (scale,
    zero_point)."""
    if observer is not None:
        for k, b in observer._buffers.items():
            if b is not None:
                observer._buffers[k] = b.new_empty(0)


def _merge(parts: list[Frozen], named) -> Frozen:
    """One Frozen, its entries in graph order (as ``freeze`` orders them in memory)."""
    acts, weights, codes, in_scales, kept = {}, {}, {}, {}, set()
    for p in parts:
        acts.update(p.activations)
        weights.update(p.weights)
        codes.update(p.codes)
        in_scales.update(p.in_scales)
        kept |= p.kept
    order = [n.name for n in named.nodes]

    def ordered(d: dict) -> dict:
        return {k: d[k] for k in order if k in d}

    return Frozen(ordered(acts), ordered(weights), ordered(codes), kept=kept,
                  in_scales=ordered(in_scales))


def _to_meta(gm, strip, ck: Checkpoint) -> dict[str, str]:
    """Swap every graph tensor that is a checkpoint parameter for a meta tensor ->
    {graph target: the source model's state name} (what ``Checkpoint.tensor`` reads)."""
    lazy = {}
    for target, t in [*gm.named_parameters(remove_duplicate=False),
                      *gm.named_buffers(remove_duplicate=False)]:
        name = strip(target)
        if name in ck.params:
            lazy[target] = name
            set_tensor(gm, target, torch.empty(t.shape, dtype=t.dtype, device="meta"))
    for mod in ck.model.modules():   # the skeleton's: shapes only from here on
        for k, p in mod._parameters.items():
            if p is not None and not p.is_meta:
                mod._parameters[k] = torch.nn.Parameter(
                    torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
    return lazy


def _meta_like(gm, target: str) -> torch.Tensor:
    t = param(gm, target)
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


# --------------------------------------------------------------------------- refusals

def _diag(loc: str, message: str, hint: str | None = None) -> Diagnostic:
    file, line, col = (loc.rsplit(":", 2) + ["1", "1"])[:3] if loc.count(":") >= 2 \
        else (loc or "<recipe>", "1", "1")
    try:
        return Diagnostic(file, int(line), int(col), message, hint=hint)
    except ValueError:
        return Diagnostic(loc, 1, 1, message, hint=hint)


def _refuse_settings(r: Recipe, st: Settings, lower: str) -> None:
    if lower != "fake":
        raise ModelError(f"compile --stream writes --lower fake artifacts; --lower {lower} "
                         "is not supported with --stream (compile without --stream)")
    if st.student_blocks:
        raise ModelError("`student.blocks` is not supported with --stream: the student is "
                         "built from the whole teacher (compile without --stream)")


def _refuse_plan(r: Recipe, plan) -> None:
    """Transforms (smooth, rotate): a located RecipeError naming the rule. GPTQ / AWQ
    are per linear and run per stage (``_calibrate_and_freeze``)."""
    diags = [_diag(t.loc, f"`{t.kind}` is not supported with --stream: it moves weights "
                          "across blocks of the whole model",
                   hint="compile without --stream") for t in plan.transforms]
    if diags:
        raise RecipeError(diags)
