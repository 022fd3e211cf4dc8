"""``qdsl train --init ARTIFACT``: start the student from a trained student's weights.

XTC's two-step schedule (Wu et al. 2022, de Moor et al. 2023): first train the
layer-reduced float student (``recipes/demoor/2l.qrec``), then quantize *that* student
(``1w8a2l.qrec``) and train it again with the full float model as teacher. Step 2 is
``qdsl train 1w8a2l.qrec --model TEACHER --init STEP1_ARTIFACT``.

The artifact must be a self-contained one (``qdsl train`` writes those) whose stored
weights are float (no weight quantizer: a quantized weight would have to be
dequantized first, and its rounding is exactly what step 2 retrains), of the same
teacher and the same ``student.blocks``: every trainable parameter of the student is
taken from it by name, shapes checked. Anything else is an error naming the artifact
and the tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..artifact.store import read_artifact
from ..artifact.tensors import read_safetensors
from ..errors import ArtifactError, ModelError

PREFIX = "model."  # the graph wraps the eager model as its `model` attribute


def load_init(student: torch.nn.Module, path, *, model_id: str,
              student_blocks: str | None) -> dict:
    """Copy the float weights of artifact ``path`` into ``student`` (in place); its
    identity: the sha256 of its weights file (what ``--resume`` compares) and its path. ``model_id``: the teacher's id (the artifact's source
    must be the same model); ``student_blocks``: the recipe's ``student.blocks``."""
    path = Path(path)
    try:
        meta, _, _ = read_artifact(path)
    except ArtifactError as e:
        raise ModelError(f"--init: {e}") from e
    where = f"--init {path}"
    src = (meta.get("model") or {}).get("id")
    if src != model_id:
        raise ModelError(f"{where}: the artifact was trained from {src!r}, the teacher is "
                         f"{model_id!r}")
    theirs = (meta.get("settings") or {}).get("student_blocks")
    if theirs != student_blocks:
        raise ModelError(f"{where}: its student.blocks is {theirs!r}, the recipe's is "
                         f"{student_blocks!r} (the student must keep the same blocks)")
    int8 = meta.get("int8") or {}
    if meta.get("lower") != "int8" or not int8.get("self_contained"):
        raise ModelError(f"{where}: not a self-contained artifact (its weights are not "
                         "stored); use one `qdsl train` wrote")
    wq = (meta.get("quantizers") or {}).get("weights") or []
    if wq:
        raise ModelError(f"{where}: its weights are quantized ({len(wq)} weight "
                         "quantizers); --init takes a float student (step 1 of XTC, "
                         "e.g. recipes/demoor/2l.qrec)")
    try:
        stored = read_safetensors(path, "model.safetensors")
    except ArtifactError as e:
        raise ModelError(f"--init: {e}") from e
    aliases = int8.get("aliases") or {}
    n = 0
    with torch.no_grad():
        names: dict[int, list[str]] = {}  # a tied parameter (GPT-2's wte / lm_head): all names
        for name, p in student.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
        for name, p in student.named_parameters():
            keys = [aliases.get(PREFIX + k, PREFIX + k) for k in names[id(p)]]
            key = next((k for k in keys if k in stored), keys[0])
            t = stored.get(key)
            if t is None:
                raise ModelError(f"{where}: no tensor for the student's parameter {name!r} "
                                 f"(expected {key!r} in model.safetensors)")
            if tuple(t.shape) != tuple(p.shape) or not t.is_floating_point():
                raise ModelError(f"{where}: {key} is {t.dtype} {tuple(t.shape)}, the "
                                 f"student's {name} is {p.dtype} {tuple(p.shape)}")
            p.copy_(t.to(p.dtype))
            n += 1
    if n == 0:
        raise ModelError(f"{where}: the student has no parameters to initialise")
    files = meta.get("files") or {}
    return {"path": str(path),
            "sha256": (files.get("model.safetensors") or {}).get("sha256")}
