"""``qdsl.load``: rebuild a compiled model from an artifact without calibrating.

    artifact --read_artifact--> meta, plan.json, tensors
    source model --capture--> --name--> plan (checked against the recorded recipe)
    --FAKE | INT8 pipeline (stored quantizers; qdsl.passes.pipeline)--> QuantizedModel
"""

from __future__ import annotations

import os
from pathlib import Path

from ..artifact.store import read_artifact
from ..config.recipe import Recipe, Settings
from ..errors import ArtifactError
from ..graph.capture import capture, max_positions
from ..graph.naming import name_graph
from ..passes.freeze import Frozen
from ..passes.pipeline import PassContext, lowering, run
from .build import ModelArg, QuantizedModel, as_model, student_of
from .lowered import load_int8
from .source import artifact_errors, check_source, local_source, plan_of


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
    meta, plan_json, tensors = read_artifact(path, verify=verify)
    recache = max_cache_len is not None and max_cache_len != meta["max_cache_len"]
    if recache:
        meta = {**meta, "max_cache_len": max_cache_len}
    if meta["lower"] == "int8" and meta["int8"]["self_contained"]:
        return load_int8(path, meta, plan_json, tensors, model, same_model=recache)
    m, tok, model_id = as_model(model if model is not None
                                else local_source(meta["model"]["id"], path))
    got = check_source(m, meta, path)
    recipe = Recipe.from_json(meta["recipe"]["rules"],
                              text=(Path(path) / "recipe.qrec").read_text(encoding="utf-8"))
    m, _ = student_of(m, recipe, meta["settings"].get("student_blocks"))  # layer reduction
    if meta["mode"] == "generate" and not recache and meta["max_cache_len"] > max_positions(m):
        raise ArtifactError(f"artifact {path}: qdsl_artifact.json: max_cache_len "
                            f"{meta['max_cache_len']} exceeds the model's {max_positions(m)} "
                            "positions")
    captured = capture(m, mode=meta["mode"], max_cache_len=meta["max_cache_len"])
    named = name_graph(captured)
    plan = plan_of(path, meta, plan_json, named, same_model=recache)
    with artifact_errors(path, "quant_params.safetensors does not fit the model"):
        frozen = Frozen.from_state(meta["quantizers"], tensors)
        int8 = meta["lower"] == "int8"
        ctx = PassContext(named, plan, frozen=frozen,
                          fallback=meta["int8"]["fallback"] if int8 else "error",
                          lower_compute=meta["settings"].get("lower_compute"))
        gm = run(lowering("int8" if int8 else "fake"), captured.gm, ctx)
    return QuantizedModel(gm, named=named, plan=plan, recipe=recipe, frozen=frozen,
                          lower=meta["lower"], mode=meta["mode"],
                          max_cache_len=meta["max_cache_len"], source_id=model_id,
                          source_hash=got, settings=Settings(**meta["settings"]), tokenizer=tok)


def load_artifact_lm(path: str | os.PathLike, model: ModelArg | None = None,
                     max_cache_len: int | None = None, *, verify: bool = True):
    """An artifact as a ``CausalLM`` (what ``qdsl eval`` and ``qdsl bench`` run);
    ``max_cache_len`` and ``verify`` as in ``load``."""
    q = load(path, model, max_cache_len=max_cache_len, verify=verify)
    lm = q.lm(name=f"qdsl:{Path(path).name}")
    lm.tokenizer = q.tokenizer
    return lm
