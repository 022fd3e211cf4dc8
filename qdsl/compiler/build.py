"""The library functions behind ``qdsl explain`` and ``qdsl compile``.

    recipe text --lang--> Recipe
    model --capture--> fx graph --name--> NamedGraph --match(Recipe)--> QuantPlan
    (compile) --insert_observers--> --calibrate--> --freeze--> --lower--> quantized graph
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ArtifactError, QdslError
from ..models.limits import Limit, fit_length
from ..plan import QuantPlan, build_plan
from ..config.recipe import Recipe

ModelArg = Any  # a short name / directory / hub id, or an nn.Module


def as_recipe(recipe: Recipe | str | os.PathLike) -> Recipe:
    """A Recipe, or a path to a .qrec file, or recipe text (if it contains '->')."""
    from ..lang import load_recipe, parse_recipe

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
    from ..models.zoo import load_model

    m, tok = load_model(str(model))
    return m, tok, str(model)


@dataclass
class Explanation:
    recipe: Recipe
    captured: Any  # qdsl.graph.capture.Captured
    named: Any     # qdsl.graph.naming.NamedGraph
    plan: QuantPlan
    lower: str

    def _execution(self):
        if self.lower != "int8":
            return None
        from ..passes.int8_exec import execution

        table = execution(self.captured.gm, self.named, self.plan)
        return lambda entry: table[entry.name]

    def rows(self) -> list[dict[str, Any]]:
        from .render import rows

        return rows(self.plan, self.named, self._execution())

    def table(self) -> str:
        from .render import render_table

        return render_table(self.rows())

    def summary(self) -> str:
        from .render import render_summary

        return render_summary(self.plan, self.captured.gm, self.named)

    def draw(self, path: str, block: int = 0) -> None:
        from .render import draw_block

        draw_block(self.captured.gm, self.named, self.plan, path, block=block)


def explain(recipe: Recipe | str, model: ModelArg, *, lower: str | None = None,
            example_inputs: tuple | None = None) -> Explanation:
    """Capture ``model`` (plain graph), name it, and match ``recipe``: no data needed."""
    from ..graph.capture import capture
    from ..graph.naming import name_graph
    from ..passes.validate import validate_plan

    r = as_recipe(recipe)
    m, _, _ = as_model(model)
    captured = capture(m, example_inputs, mode="plain")
    named = name_graph(captured)
    plan = build_plan(r, named)
    validate_plan(captured.gm, named, plan)
    return Explanation(r, captured, named, plan, lower or r.settings.lower or "fake")


# --------------------------------------------------------------------------- compile

DEFAULT_MAX_CACHE_LEN = 1024  # generate-mode graphs: context + new tokens must fit


def is_causal_lm(model: torch.nn.Module) -> bool:
    can = getattr(model, "can_generate", None)
    return bool(can and can())


class QuantizedModel(torch.nn.Module):
    """A compiled model: the quantized fx graph plus everything needed to save,
    explain and run it. ``forward(input_ids [B, T]) -> logits [B, T, V]``."""

    def __init__(self, gm, *, named, plan: QuantPlan, recipe: Recipe, frozen, lower: str,
                 mode: str, max_cache_len: int, source_id: str, source_hash: str,
                 settings, tokenizer=None, model_config=None, fallback: str = "error"):
        super().__init__()
        self.gm = gm
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
        from ..runtime.graphlm import GraphLM

        if self.mode != "generate":
            from ..errors import ModelError

            raise ModelError(f"{self.source_id} is an encoder / base model captured as a "
                             f"plain graph (mode {self.mode!r}): eval, bench and HumanEval "
                             "need a causal LM; explain and compile work")
        return GraphLM(self.gm, self.max_cache_len, name=name or f"qdsl:{self.recipe.source}")

    def save(self, out: str | os.PathLike, *, force: bool = False):
        from ..artifact.store import write_artifact

        config, tensors = self.frozen.to_state()
        meta = {"model": {"id": self.source_id, "hash": self.source_hash},
                "recipe": {"source": self.recipe.source, "hash": self.recipe.hash(),
                           "rules": self.recipe.to_json()},
                "settings": self.settings.to_json(), "lower": self.lower, "mode": self.mode,
                "max_cache_len": self.max_cache_len, "graph_hash": self.plan.graph_hash,
                "quantizers": config}
        extra, write_more = None, None
        if self.lower == "int8":
            from ..artifact.store import lowered_state

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
        """config.json and tokenizer files under ``d/model`` (what qdsl.load rebuilds from)."""
        if self.model_config is not None:
            self.model_config.save_pretrained(d / "model")
        if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(d / "model")


def _calib_runner(captured, mode: str, max_cache_len: int):
    if mode == "generate":
        from ..runtime.graphlm import GraphLM

        return GraphLM(captured.gm, max_cache_len).logits
    return captured.gm


def compile(model: ModelArg, recipe: Recipe | str, calib=None, *, tokenizer=None,
            settings=None, lower: str | None = None, max_cache_len: int | None = None,
            progress: bool = True, fallback: str = "error") -> QuantizedModel:
    """Compile ``recipe`` for ``model``: capture, name, match, observe, calibrate, freeze, lower.

    ``calib``: a directory of code, a saved ``datasets`` dataset, ``"stdlib"``, or a
    tensor of token windows [N, T]; overrides the recipe's ``calib.data``.
    ``settings``: a ``qdsl.config.recipe.Settings`` overriding the recipe's (the command line).
    ``fallback`` (``lower="int8"``): "error" refuses ops with no integer kernel;
    "simulate" keeps them fake-quant, warns and records them (``QuantizedModel.fallbacks``).
    ``max_cache_len`` (generate mode) None: 1024 clipped to the model's positions with a
    warning; the calibration window length (``calib.seq_len``) unset: 256 clipped to what
    the graph takes. A given length that does not fit is an ``OptionError``, raised before
    capture.
    """
    from ..models.calib import DEFAULT_SEQ_LEN, CalibSpec, CalibrationError, calibration_windows
    from ..graph.capture import capture, max_positions
    from ..passes.validate import validate_plan
    from ..graph.naming import name_graph
    from ..passes.calibrate import calibrate
    from ..passes.freeze import freeze
    from ..passes.insert_observers import insert_observers
    from ..passes.lower_fake import lower_fake
    from ..config.recipe import Settings

    r = as_recipe(recipe)
    st = r.settings.then(settings or Settings())
    lower = lower or st.lower or "fake"
    m, tok, model_id = as_model(model)
    tok = tokenizer or tok
    mode = "generate" if is_causal_lm(m) else "plain"
    positions = max_positions(m)
    if mode == "generate":  # the cache cannot outgrow the position table
        max_cache_len = fit_length("--max-cache-len", max_cache_len, DEFAULT_MAX_CACHE_LEN,
                                   Limit(positions, f"the model has {positions} positions"))
        takes = Limit(max_cache_len - 1, f"the graph's cache of {max_cache_len} slots "
                                         f"runs {max_cache_len - 1} tokens")
    else:  # the captured graph's dynamic length stops one below the position table
        max_cache_len = max_cache_len or DEFAULT_MAX_CACHE_LEN
        takes = Limit(positions - 1, f"the captured graph takes {positions - 1} tokens")
    seq_option = "calib.seq_len (--seq-len)"
    if st.calib_seq_len is not None:  # a given length is checked before capture
        fit_length(seq_option, st.calib_seq_len, DEFAULT_SEQ_LEN, takes)
    captured = capture(m, mode=mode, max_cache_len=max_cache_len)
    named = name_graph(captured)
    plan = build_plan(r, named)
    validate_plan(captured.gm, named, plan)
    observers = insert_observers(captured.gm, named, plan)
    if observers:
        source = calib if calib is not None else st.calib_data
        if source is None:
            raise CalibrationError(
                f"the recipe quantizes {len(observers)} activations statically: give "
                "calibration data (--calib DIR, or `set calib.data = \"DIR\"` in the recipe)")
        if isinstance(source, torch.Tensor):
            windows = source
        else:
            if tok is None:
                raise CalibrationError("calibration from text needs the model's tokenizer")
            windows = calibration_windows(CalibSpec(
                str(source), samples=st.calib_samples or 128,
                seq_len=fit_length(seq_option, st.calib_seq_len, DEFAULT_SEQ_LEN, takes),
                seed=st.calib_seed if st.calib_seed is not None else 0), tok)
        if windows.shape[1] > takes.tokens:
            raise CalibrationError(
                f"calibration windows of {windows.shape[1]} tokens do not fit: {takes.why}; "
                f"use windows of {takes.tokens} tokens or less (--seq-len {takes.tokens})")
        calibrate(_calib_runner(captured, mode, max_cache_len), windows,
                  batch_size=1 if mode == "generate" else (st.calib_batch_size or 8),
                  progress=progress)
    frozen = freeze(captured.gm, named, plan, observers)
    gm = lower_fake(captured.gm, named, plan, frozen)
    if lower == "int8":
        from ..passes.lower_int8 import lower_int8

        gm = lower_int8(gm, named, plan, frozen, fallback=fallback, compute=st.lower_compute)
    from ..artifact.store import module_hash

    return QuantizedModel(gm, named=named, plan=plan, recipe=r, frozen=frozen, lower=lower,
                          mode=mode, max_cache_len=max_cache_len, source_id=model_id,
                          source_hash=module_hash(m), settings=st, tokenizer=tok,
                          model_config=getattr(m, "config", None), fallback=fallback)


def load(path: str | os.PathLike, model: ModelArg | None = None,
         max_cache_len: int | None = None, *, verify: bool = True) -> QuantizedModel:
    """Rebuild a compiled model from an artifact and its source model, without calibrating.

    Self-contained ``--lower int8`` artifacts need no source model (``model`` given:
    it must be the one compiled from); see ``qdsl.compiler.lowered``. Other artifacts
    load against ``model``, or else the recorded source if it is on this machine (a
    short name, a directory, a hub snapshot already cached): nothing is downloaded.
    ``max_cache_len`` re-captures with another static key/value cache than the
    compile's (e.g. to generate longer sequences than it was calibrated for); the
    quantizers, fitted per node, are reused unchanged. ``verify=False`` skips the
    comparison of each file with its recorded sha256 (``--no-verify``); every other
    check of ``qdsl.artifact.store.read_artifact`` still runs.
    """
    from ..artifact.store import read_artifact
    from ..graph.capture import capture, max_positions
    from ..graph.naming import name_graph
    from ..passes.freeze import Frozen
    from ..passes.lower_fake import lower_fake
    from ..config.recipe import Settings

    meta, plan_json, tensors = read_artifact(path, verify=verify)
    recache = max_cache_len is not None and max_cache_len != meta["max_cache_len"]
    if recache:
        meta = {**meta, "max_cache_len": max_cache_len}
    if meta["lower"] == "int8" and meta["int8"]["self_contained"]:
        from .lowered import load_int8

        return load_int8(path, meta, plan_json, tensors, model, same_model=recache)
    m, tok, model_id = as_model(model if model is not None
                                else local_source(meta["model"]["id"], path))
    got = check_source(m, meta, path)
    if meta["mode"] == "generate" and not recache and meta["max_cache_len"] > max_positions(m):
        raise ArtifactError(f"artifact {path}: qdsl_artifact.json: max_cache_len "
                            f"{meta['max_cache_len']} exceeds the model's {max_positions(m)} "
                            "positions")
    captured = capture(m, mode=meta["mode"], max_cache_len=meta["max_cache_len"])
    named = name_graph(captured)
    plan = plan_of(path, meta, plan_json, named, same_model=recache)
    with artifact_errors(path, "quant_params.safetensors does not fit the model"):
        frozen = Frozen.from_state(meta["quantizers"], tensors)
        gm = lower_fake(captured.gm, named, plan, frozen)
        if meta["lower"] == "int8":
            from ..passes.lower_int8 import lower_int8

            gm = lower_int8(gm, named, plan, frozen, fallback=meta["int8"]["fallback"],
                            compute=meta["settings"].get("lower_compute"))
    recipe = Recipe.from_json(meta["recipe"]["rules"],
                              text=(Path(path) / "recipe.qrec").read_text(encoding="utf-8"))
    return QuantizedModel(gm, named=named, plan=plan, recipe=recipe, frozen=frozen,
                          lower=meta["lower"], mode=meta["mode"],
                          max_cache_len=meta["max_cache_len"], source_id=model_id,
                          source_hash=got, settings=Settings(**meta["settings"]), tokenizer=tok)


def local_source(model_id: str, path) -> str:
    """An artifact's recorded source model if it is on this machine (a short name, a
    directory, a hub snapshot already in the cache); never downloads: loading an
    artifact must not fetch what a file in it names."""
    from ..models.zoo import SHORT_NAMES

    if model_id.lower() in SHORT_NAMES or Path(model_id).expanduser().is_dir():
        return model_id
    if model_id.count("/") == 1 and not model_id.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(model_id, local_files_only=True)
        except Exception:  # not cached (or no huggingface_hub): refused below
            pass
    raise ArtifactError(
        f"artifact {path} was compiled from {model_id!r}, which is not a short name or a "
        "model directory on this machine (loading an artifact never downloads a model); "
        "pass the source model: --baseline DIR, or qdsl.load(path, model=DIR)")


@contextmanager
def artifact_errors(path, what: str):
    """Failures while applying an artifact's stored parameters -> one ArtifactError
    ``artifact PATH: WHAT: the failure``."""
    try:
        yield
    except ArtifactError:
        raise
    except (QdslError, RuntimeError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ArtifactError(f"artifact {path}: {what}: {type(e).__name__}: "
                            f"{str(e)[:200]}") from None


def plan_of(path, meta: dict, plan_json: dict, named, same_model: bool) -> QuantPlan:
    """plan.json as a QuantPlan that fits ``named`` and is exactly what the recorded
    recipe gives on it (the cross-check of plan and recipe)."""
    from dataclasses import replace

    from ..config.recipe import Loc

    with artifact_errors(path, "plan.json does not fit the model"):
        plan = QuantPlan.from_json(plan_json)
        plan.check_graph(named, same_model=same_model)
        recorded = Recipe.from_json(meta["recipe"]["rules"])
        # locations point into the compiling machine's files: never read them here
        rules = tuple(replace(r, loc=Loc("<artifact>", r.loc.line, r.loc.col))
                      for r in recorded.rules)
        again = build_plan(Recipe(rules, recorded.settings, source="<artifact>"), named)
    for got, want in zip(plan.entries, again.entries):
        if got != want:
            raise ArtifactError(f"artifact {path}: plan.json does not agree with the recipe "
                                f"recorded in qdsl_artifact.json at node {got.name}")
    if len(plan.entries) != len(again.entries):
        raise ArtifactError(f"artifact {path}: plan.json has {len(plan.entries)} nodes, the "
                            f"recorded recipe plans {len(again.entries)}")
    return plan


def check_source(m, meta: dict, path) -> str:
    """``m``'s content hash, if it is the model the artifact at ``path`` was compiled
    from; else an ArtifactError naming both."""
    from ..artifact.store import module_hash

    got = module_hash(m)
    if got != meta["model"]["hash"]:
        raise ArtifactError(
            f"artifact {path} was compiled from model {meta['model']['id']!r} "
            f"(hash {meta['model']['hash']}), not this one (hash {got}); "
            "load it against the model it was compiled from")
    return got


def load_artifact_lm(path: str | os.PathLike, model: ModelArg | None = None,
                     max_cache_len: int | None = None, *, verify: bool = True):
    """An artifact as a ``CausalLM`` (what ``qdsl eval`` and ``qdsl bench`` run);
    ``max_cache_len`` and ``verify`` as in ``load``."""
    q = load(path, model, max_cache_len=max_cache_len, verify=verify)
    lm = q.lm(name=f"qdsl:{Path(path).name}")
    lm.tokenizer = q.tokenizer
    return lm
