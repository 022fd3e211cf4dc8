"""``qdsl.load``: rebuild a compiled model from an artifact without calibrating.

    artifact --read_artifact--> meta, plan.json, tensors
    source model --capture--> --name--> plan (checked against the recorded recipe)
    --FAKE | INT8 pipeline (stored quantizers; qdsl.passes.pipeline)--> QuantizedModel
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..artifact.store import MARKER as ARTIFACT_FILE, read_artifact
from ..config.recipe import Recipe, Settings
from ..config.spec import PerToken
from ..errors import ArtifactError
from ..graph.capture import capture, max_positions
from ..graph.naming import name_graph
from ..passes.freeze import Frozen
from ..passes.pipeline import PassContext, lowering, run
from ..plan import QuantPlan
from ..runtime.graphlm import GraphLM
from .build import ModelArg, QuantizedModel, as_model, student_of
from .graphfile import GRAPH_FILE
from .lowered import load_int8, stored_graph, tokenizer
from .source import artifact_errors, check_source, local_source, plan_of

log = logging.getLogger(__name__)


def load(path: str | os.PathLike, model: ModelArg | None = None,
         max_cache_len: int | None = None, *, verify: bool = True,
         batch_size: int = 1) -> QuantizedModel:
    """Rebuild a compiled model from an artifact and its source model, without calibrating.

    Self-contained ``--lower int8`` artifacts need no source model (``model`` given:
    it must be the one compiled from); see ``qdsl.compiler.lowered``. Other artifacts
    load against ``model``, or else the recorded source if it is on this machine (a
    short name, a directory, a hub snapshot already cached): nothing is downloaded.
    ``max_cache_len`` re-captures with another static key/value cache than the
    compile's (e.g. to generate longer sequences than it was calibrated for); the
    quantizers, fitted per node, are reused unchanged. ``verify=False`` skips the
    comparison of each file with its recorded sha256 (``--no-verify``); every other
    check of ``qdsl.artifact.store.read_artifact`` still runs. ``batch_size`` B > 1
    (generate mode): a graph of B left-padded rows per forward (``qdsl.graph.capture``;
    another capture of the same model, like another cache length), unless the plan
    quantizes an activation dynamically over more than one token (``batch_mixing``):
    then a warning and batch 1.
    """
    meta, plan_json, tensors = read_artifact(path, verify=verify)
    batch_size = _batch_for(path, meta, plan_json, batch_size)
    recache = max_cache_len is not None and max_cache_len != meta["max_cache_len"]
    if recache:
        meta = {**meta, "max_cache_len": max_cache_len}
    if meta["lower"] == "int8" and meta["int8"]["self_contained"]:
        return load_int8(path, meta, plan_json, tensors, model,
                         same_model=recache or batch_size > 1, batch_size=batch_size)
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
    captured = capture(m, mode=meta["mode"], max_cache_len=meta["max_cache_len"],
                       batch_size=batch_size)
    named = name_graph(captured)
    plan = plan_of(path, meta, plan_json, named, same_model=recache or batch_size > 1)
    with artifact_errors(path, "quant_params.safetensors does not fit the model"):
        frozen = Frozen.from_state(meta["quantizers"], tensors)
        int8 = meta["lower"] == "int8"
        ctx = PassContext(named, plan, frozen=frozen,
                          fallback=meta["int8"]["fallback"] if int8 else "error",
                          lower_compute=meta["settings"].get("lower_compute"),
                          kv_cache=meta["settings"].get("lower_kv_cache"))
        gm = run(lowering("int8" if int8 else "fake"), captured.gm, ctx)
        named = ctx.named  # a transform may have untied a weight
    return QuantizedModel(gm, named=named, plan=plan, recipe=recipe, frozen=frozen,
                          lower=meta["lower"], mode=meta["mode"],
                          max_cache_len=meta["max_cache_len"], source_id=model_id,
                          source_hash=got, settings=Settings(**meta["settings"]), tokenizer=tok,
                          batch_size=batch_size)


def batch_mixing(plan: QuantPlan) -> str | None:
    """Why the plan's graph cannot run several samples in one forward without one
    changing another's numbers, or None: a dynamic activation quantizer whose scale
    spans more than one token (per_tensor, per_group) would take it over every row."""
    for e in plan.entries:
        a = e.activation
        if a.quantized and a.dynamic and not isinstance(a.granularity, PerToken):
            return (f"node {e.name} quantizes its input dynamically {a.granularity.name}, "
                    "so one scale would span the batch's samples")
    return None


def _why_not_batched(meta: dict, plan_json: dict) -> str | None:
    return ("it is a plain graph (mode 'plain'), not a generate graph"
            if meta["mode"] != "generate" else batch_mixing(QuantPlan.from_json(plan_json)))


def batch_blocker(path: str | os.PathLike) -> str | None:
    """Why the artifact at ``path`` runs one sample per forward (a plain graph, or
    ``batch_mixing``), or None; read from its JSON files without the checks of a load
    (an unreadable artifact: None, and loading it says what is wrong)."""
    try:
        meta = json.loads((Path(path) / ARTIFACT_FILE).read_text(encoding="utf-8"))
        plan_json = json.loads((Path(path) / "plan.json").read_text(encoding="utf-8"))
        return _why_not_batched(meta, plan_json)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _batch_for(path, meta: dict, plan_json: dict, batch_size: int) -> int:
    """``batch_size``, or 1 (with a warning saying why) where the artifact cannot batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: at least 1")
    if batch_size == 1:
        return 1
    why = _why_not_batched(meta, plan_json)
    if why:
        log.warning("%s runs one sample per forward (batch size 1, not %d): %s", path,
                    batch_size, why)
        return 1
    return batch_size


def load_artifact_lm(path: str | os.PathLike, model: ModelArg | None = None,
                     max_cache_len: int | None = None, *, verify: bool = True,
                     batch_size: int = 1):
    """An artifact as a ``CausalLM`` (what ``qdsl eval`` and ``qdsl bench`` run);
    ``max_cache_len``, ``verify`` and ``batch_size`` as in ``load`` (the LM's
    ``batch_size`` says what it got). A self-contained int8 artifact with a stored graph
    (``graph.json``, same cache length and batch size) runs that graph: no model is
    rebuilt or captured (``qdsl.compiler.graphfile``: faster, and ~50 MiB less resident
    memory on SmolLM2-135M); anything else loads through ``load``."""
    name = f"qdsl:{Path(path).name}"
    if model is None and (Path(path) / GRAPH_FILE).is_file():   # (a given model: load checks it)
        meta, _, _ = read_artifact(path, verify=verify)
        gm = (stored_graph(Path(path), meta, max_cache_len, batch_size)
              if meta["mode"] == "generate" else None)   # (load says why plain cannot run)
        if gm is not None:
            lm = GraphLM(gm, meta["max_cache_len"], name=name, batch_size=batch_size)
            lm.tokenizer = tokenizer(Path(path) / "model")
            return lm
        verify = False   # its files were just hashed: load's structural checks suffice
    q = load(path, model, max_cache_len=max_cache_len, verify=verify, batch_size=batch_size)
    lm = q.lm(name=name)
    lm.tokenizer = q.tokenizer
    return lm
