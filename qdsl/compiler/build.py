"""The library functions behind ``qdsl explain`` and ``qdsl compile``.

    recipe text --lang--> Recipe
    model --capture--> fx graph --name--> NamedGraph --match(Recipe)--> QuantPlan
    (compile) [--STATISTICS (+ its feed)-->] --OBSERVE--> --CALIBRATE + FREEZE + FAKE | INT8--> quantized graph
    (the pipelines of ``qdsl.passes.pipeline``)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import torch

from ..models.limits import DEFAULT_MAX_CACHE_LEN, Limit, fit_length
from ..plan import QuantPlan, build_plan
from ..artifact.store import lowered_state, module_hash, write_artifact
from ..config.recipe import Recipe, Settings
from ..config.student import StudentError, located, student_map
from ..errors import ModelError, OptionError, RecipeError
from ..graph.capture import capture, max_positions
from ..graph.naming import name_graph
from ..lang import load_recipe, parse_recipe
from ..models import zoo
from ..models.limits import blocks_of_config
from ..models.student import make_student
from ..models.calib import DEFAULT_SEQ_LEN, CalibSpec, CalibrationError, calibration_windows
from ..passes.int8_exec import execution
from ..passes.pipeline import (CALIBRATE, FREEZE, OBSERVE, STATISTICS, VALIDATE, Feed,
                               PassContext, lowering, run)
from ..progress import Progress
from ..runtime import kernels
from ..runtime.graphlm import GraphLM
from . import graphfile
from .exportcheck import export_diagnostics, export_verdicts, verdict_rows
from .render import draw_block, render_summary, render_table, rows

ModelArg = Any  # a short name / directory / hub id, or an nn.Module


def as_recipe(recipe: Recipe | str | os.PathLike) -> Recipe:
    """A Recipe, or a path to a .qrec file, or recipe text (if it contains '->')."""
    if isinstance(recipe, Recipe):
        return recipe
    text = str(recipe)
    if "->" in text or "\n" in text:
        return parse_recipe(text)
    return load_recipe(text)


def as_model(model: ModelArg):
    """(nn.Module, tokenizer or None, model id) from a model argument."""
    if isinstance(model, torch.nn.Module):
        return model.eval(), None, type(model).__name__

    m, tok = zoo.load_model(str(model))
    return m, tok, str(model)


def student_of(m: torch.nn.Module, r: Recipe, value: str | None = None):
    """(model, None) or, with ``student.blocks`` set, (the layer-reduced student, the
    teacher block each student block starts from); a bad index is a located error."""
    value = value if value is not None else r.settings.student_blocks
    if not value:
        return m, None
    n = blocks_of_config(getattr(m, "config", None) or {})
    if n is None:
        raise ModelError(f"`student.blocks`: {type(m).__name__} states no block count")
    try:
        blocks = student_map(value, n)
    except StudentError as e:
        raise located(e, r.text, r.source) from e
    return make_student(m, blocks), blocks


@dataclass
class Explanation:
    recipe: Recipe
    captured: Any  # qdsl.graph.capture.Captured
    named: Any     # qdsl.graph.naming.NamedGraph
    plan: QuantPlan
    lower: str
    export: dict | None = None  # `set export`: canonical name -> problems (exportcheck)
    student: tuple[int, ...] | None = None  # teacher block of each student block
    teacher_blocks: int | None = None

    @property
    def export_errors(self) -> list:
        """The export problems as located errors (empty: none, or no `set export`)."""
        if self.export is None:
            return []
        return export_diagnostics(self.export, self.plan, self.recipe.settings.export,
                                  self.recipe.text or "", self.recipe.source)

    def _execution(self):
        if self.lower != "int8":
            return None

        table = execution(self.captured.gm, self.named, self.plan)
        return lambda entry: table[entry.name]

    def rows(self) -> list[dict[str, Any]]:
        out = rows(self.plan, self.named, self._execution())
        if self.export is not None:
            verdicts = verdict_rows(self.export, self.recipe.settings.export)
            for row in out:
                row["export"] = verdicts[row["name"]]
        return out

    def table(self) -> str:
        return render_table(self.rows())

    def summary(self) -> str:
        text = render_summary(self.plan, self.captured.gm, self.named)
        if self.student is not None:
            pairs = ", ".join(f"{i} <- {t}" for i, t in enumerate(self.student))
            text += (f"\nstudent (student.blocks = {self.recipe.settings.student_blocks}): "
                     f"{len(self.student)} of {self.teacher_blocks} teacher blocks; "
                     f"student block <- teacher block: {pairs}")
        kv = self.recipe.settings.lower_kv_cache
        if kv not in (None, "fp32"):
            text += (f"\nkey/value cache: {kv} (lower.kv_cache): keys and values rounded to "
                     f"{kv} at each cache write" + (f", stored in {kv} (half the cache bytes "
                     "a decode step reads)" if self.lower == "int8" else ""))
        return text

    def kernel_lines(self) -> list[str]:
        """Under ``--lower int8``: the kernel each runtime operation runs on this CPU
        (``qdsl.runtime.kernels``, timed once per machine), saying where it is
        dequantize + float GEMM; empty otherwise."""
        if self.lower != "int8":
            return []
        return kernels.summary_lines(kernels.report())

    def draw(self, path: str, block: int = 0) -> None:
        draw_block(self.captured.gm, self.named, self.plan, path, block=block)


def explain(recipe: Recipe | str, model: ModelArg, *, lower: str | None = None,
            example_inputs: tuple | None = None) -> Explanation:
    """Capture ``model`` (plain graph), name it, and match ``recipe``: no data needed."""
    r = as_recipe(recipe)
    m, _, _ = as_model(model)
    teacher_blocks = blocks_of_config(getattr(m, "config", None) or {})
    m, student = student_of(m, r)
    _check_kv_cache(m, r.settings.lower_kv_cache)
    captured = capture(m, example_inputs, mode="plain")
    named = name_graph(captured)
    plan = build_plan(r, named)
    run(VALIDATE, captured.gm, PassContext(named, plan))
    export = (export_verdicts(captured.gm, named, plan, r.settings.export)
              if r.settings.export else None)
    return Explanation(r, captured, named, plan, lower or r.settings.lower or "fake", export,
                       student=student, teacher_blocks=teacher_blocks)


def _check_kv_cache(model: torch.nn.Module, kv: str | None) -> None:
    """``set lower.kv_cache`` on a model with no cache does nothing: an error."""
    if kv not in (None, "fp32") and not is_causal_lm(model):
        raise OptionError(f"set lower.kv_cache = {kv}: {type(model).__name__} is not a causal "
                          "LM, its graph has no key/value cache; drop the setting")


# --------------------------------------------------------------------------- compile

def is_causal_lm(model: torch.nn.Module) -> bool:
    can = getattr(model, "can_generate", None)
    return bool(can and can())


class QuantizedModel(torch.nn.Module):
    """A compiled model: the quantized fx graph plus everything needed to save,
    explain and run it. ``forward(input_ids [B, T]) -> logits [B, T, V]``."""

    def __init__(self, gm, *, named, plan: QuantPlan, recipe: Recipe, frozen, lower: str,
                 mode: str, max_cache_len: int, source_id: str, source_hash: str,
                 settings, tokenizer=None, model_config=None, fallback: str = "error",
                 batch_size: int = 1):
        super().__init__()
        self.gm = gm
        self.batch_size = batch_size   # the generate graph's rows (qdsl.load batch_size)
        self.model_config, self.fallback = model_config, fallback
        # ops --lower int8 left as fake-quant simulation: [{"node", "reason"}]
        self.fallbacks = list(getattr(gm, "meta", {}).get("qdsl_fallbacks", []))
        self.named, self.plan, self.recipe, self.frozen = named, plan, recipe, frozen
        self.lower, self.mode, self.max_cache_len = lower, mode, max_cache_len
        self.source_id, self.source_hash, self.settings = source_id, source_hash, settings
        self.tokenizer = tokenizer

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.mode == "generate":
            return self.lm().logits(input_ids)
        return self.gm(input_ids)

    def lm(self, name: str | None = None):
        """This model as a ``CausalLM`` (generate-mode graphs only)."""
        if self.mode != "generate":
            raise ModelError(f"{self.source_id} is an encoder / base model captured as a "
                             f"plain graph (mode {self.mode!r}): eval, bench and HumanEval "
                             "need a causal LM; explain and compile work")
        return GraphLM(self.gm, self.max_cache_len, name=name or f"qdsl:{self.recipe.source}",
                       batch_size=self.batch_size)

    def save(self, out: str | os.PathLike, *, force: bool = False):
        config, tensors = self.frozen.to_state()
        meta = {"model": {"id": self.source_id, "hash": self.source_hash},
                "recipe": {"source": self.recipe.source, "hash": self.recipe.hash(),
                           "rules": self.recipe.to_json()},
                "settings": self.settings.to_json(), "lower": self.lower, "mode": self.mode,
                "max_cache_len": self.max_cache_len, "graph_hash": self.plan.graph_hash,
                "quantizers": config}
        extra, write_more = None, None
        if self.lower == "int8":
            state, aliases, runtime_state = lowered_state(self.gm)
            # weight scales live in the runtime modules (model.safetensors): keep shapes only
            shapes = {k: [list(t.shape), str(t.dtype).removeprefix("torch.")]
                      for k, t in tensors.items() if k.startswith("weight.")}
            tensors = {k: t for k, t in tensors.items() if k not in shapes}
            meta["int8"] = {"self_contained": self.model_config is not None,
                            "fallback": self.fallback, "fallbacks": self.fallbacks,
                            "aliases": aliases, "runtime_state": runtime_state,
                            "weight_qparams": shapes}
            extra = {"model.safetensors": state}
            write_more = self._write_model_files
        return write_artifact(out, meta=meta, plan=self.plan.to_json(),
                              recipe_text=self.recipe.text, tensors=tensors, extra=extra,
                              write_more=write_more, force=force)

    def _write_model_files(self, d: Path) -> None:
        """config.json and tokenizer files under ``d/model`` (what qdsl.load rebuilds from),
        and the lowered graph itself (``graph.json``, what the runtime loads:
        ``qdsl.compiler.graphfile``) where it can be stored."""
        if self.model_config is not None:
            self.model_config.save_pretrained(d / "model")
            doc = graphfile.to_json(self.gm, mode=self.mode, max_cache_len=self.max_cache_len,
                                    batch_size=self.batch_size)
            if doc is not None:
                (d / graphfile.GRAPH_FILE).write_text(json.dumps(doc, separators=(",", ":")),
                                                      encoding="utf-8")
        if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(d / "model")


def _calib_runner(captured, mode: str, max_cache_len: int):
    if mode == "generate":
        return GraphLM(captured.gm, max_cache_len).logits
    return captured.gm


SEQ_OPTION = "calib.seq_len (--seq-len)"


def fit_lengths(m: torch.nn.Module, mode: str, st: Settings, max_cache_len: int | None):
    """(the cache length, the ``Limit`` on a calibration window's tokens) for ``mode``;
    a given window length that does not fit is an OptionError, raised before capture."""
    positions = max_positions(m)
    if mode == "generate":  # the cache cannot outgrow the position table
        max_cache_len = fit_length("--max-cache-len", max_cache_len, DEFAULT_MAX_CACHE_LEN,
                                   Limit(positions, f"the model has {positions} positions"))
        takes = Limit(max_cache_len - 1, f"the graph's cache of {max_cache_len} slots "
                                         f"runs {max_cache_len - 1} tokens")
    else:  # the captured graph's dynamic length stops one below the position table
        max_cache_len = max_cache_len or DEFAULT_MAX_CACHE_LEN
        takes = Limit(positions - 1, f"the captured graph takes {positions - 1} tokens")
    if st.calib_seq_len is not None:  # a given length is checked before capture
        fit_length(SEQ_OPTION, st.calib_seq_len, DEFAULT_SEQ_LEN, takes)
    return max_cache_len, takes


def calibration_data(calib, st: Settings, tok, takes: Limit, what: str) -> torch.Tensor:
    """The calibration windows [N, T]: ``calib`` (or the recipe's ``calib.data``) read
    with ``st``'s samples / length / seed; CalibrationError saying what is missing."""
    source = calib if calib is not None else st.calib_data
    if source is None:
        raise CalibrationError(
            f"the recipe {what}: give calibration data (--calib DIR, or "
            "`set calib.data = \"DIR\"` in the recipe)")
    if isinstance(source, torch.Tensor):
        windows = source
    else:
        if tok is None:
            raise CalibrationError("calibration from text needs the model's tokenizer")
        windows = calibration_windows(CalibSpec(
            str(source), samples=st.calib_samples or 128,
            seq_len=fit_length(SEQ_OPTION, st.calib_seq_len, DEFAULT_SEQ_LEN, takes),
            seed=st.calib_seed if st.calib_seed is not None else 0), tok)
    if windows.shape[1] > takes.tokens:
        raise CalibrationError(
            f"calibration windows of {windows.shape[1]} tokens do not fit: {takes.why}; "
            f"use windows of {takes.tokens} tokens or less (--seq-len {takes.tokens})")
    return windows


def compile(model: ModelArg, recipe: Recipe | str, calib=None, *, tokenizer=None,
            settings=None, lower: str | None = None, max_cache_len: int | None = None,
            progress: Progress = True, fallback: str = "error",
            check: bool = False, reduce: bool = True,
            calib_checkpoint: tuple[str | os.PathLike, str] | None = None) -> QuantizedModel:
    """Compile ``recipe`` for ``model``: capture, name, match, observe, calibrate, freeze, lower.

    ``calib``: a directory of code, a saved ``datasets`` dataset, ``"stdlib"``, or a
    tensor of token windows [N, T]; overrides the recipe's ``calib.data``.
    ``settings``: a ``qdsl.config.recipe.Settings`` overriding the recipe's (the command line).
    ``fallback`` (``lower="int8"``): "error" refuses ops with no integer kernel;
    "simulate" keeps them fake-quant, warns and records them (``QuantizedModel.fallbacks``).
    ``max_cache_len`` (generate mode) None: 1024 clipped to the model's positions with a
    warning; the calibration window length (``calib.seq_len``) unset: 256 clipped to what
    the graph takes. A given length that does not fit is an ``OptionError``, raised before
    capture. The passes run as the pipelines of ``qdsl.passes.pipeline`` (OBSERVE,
    CALIBRATE + FREEZE + FAKE or INT8); ``check`` checks the graph after every pass (tests).
    ``student.blocks`` set: the layer-reduced student is compiled (no training: the
    post-training baseline); ``reduce=False`` takes ``model`` as the student already
    (``qdsl train`` compiles what it trained).
    ``calib_checkpoint``: (path, header): calibration saves its observers' state there
    every two minutes and resumes from it (``qdsl.passes.calibrate.CalibrationCheckpoint``;
    the sweep's long calibrations survive a stopped run); the file is removed at the end.
    """
    r = as_recipe(recipe)
    st = r.settings.then(settings or Settings())
    lower = lower or st.lower or "fake"
    lowered = FREEZE + lowering(lower)  # ValueError on an unknown mode, before any work
    m, tok, model_id = as_model(model)
    tok = tokenizer or tok
    source_hash = module_hash(m)  # the model given (the teacher): what load checks
    if calib_checkpoint is not None:   # another model's or recipe's state never resumes
        calib_checkpoint = (calib_checkpoint[0],
                            f"{calib_checkpoint[1]} {source_hash} {r.hash()} {st.to_json()}")
    if reduce:
        m, _ = student_of(m, r, st.student_blocks)
    mode = "generate" if is_causal_lm(m) else "plain"
    _check_kv_cache(m, st.lower_kv_cache)
    max_cache_len, takes = fit_lengths(m, mode, st, max_cache_len)
    captured = capture(m, mode=mode, max_cache_len=max_cache_len)
    named = name_graph(captured)
    plan = build_plan(r, named)
    if st.export:   # what the export format cannot carry: refused before any data
        errors = export_diagnostics(export_verdicts(captured.gm, named, plan, st.export), plan,
                                    st.export, r.text or "", r.source)
        if errors:
            raise RecipeError(errors)
    ctx = PassContext(named, plan, fallback=fallback, lower_compute=st.lower_compute,
                      kv_cache=st.lower_kv_cache,
                      export=st.export, progress=progress)

    def calib_feed(what: str) -> Feed:
        windows = calibration_data(calib, st, tok, takes, what)
        return Feed(_calib_runner(captured, mode, max_cache_len), windows,
                    batch_size=1 if mode == "generate" else (st.calib_batch_size or 8),
                    progress=progress, checkpoint=calib_checkpoint)

    smooths = [t for t in plan.transforms if t.kind == "smooth"]
    if smooths:  # SmoothQuant's statistics: one calibration run before the observers
        ctx.feed = calib_feed(f"smooths activations ({len(smooths)} smooth statement(s))")
        run(STATISTICS, captured.gm, ctx, check=check)
    run(OBSERVE, captured.gm, ctx, check=check)
    if (ctx.observers or ctx.input_stats) and ctx.feed is None:
        ctx.feed = calib_feed(f"quantizes {len(ctx.observers)} activations statically"
                              if ctx.observers else
                              f"rounds {len(ctx.input_stats)} weights with GPTQ / AWQ")
    gm = run(CALIBRATE + lowered, captured.gm, ctx, check=check)
    named = ctx.named  # a transform may have untied a weight
    ctx.frozen.drop_codes()  # the lowering used freeze's codes; the graph holds its own
    ctx.rounded = None

    return QuantizedModel(gm, named=named, plan=plan, recipe=r, frozen=ctx.frozen, lower=lower,
                          mode=mode, max_cache_len=max_cache_len, source_id=model_id,
                          source_hash=source_hash, settings=st, tokenizer=tok,
                          model_config=getattr(m, "config", None), fallback=fallback)
