"""Compiled artifacts: a directory of safetensors + JSON, never pickle.

    OUT/qdsl_artifact.json       what it is: qdsl version, source model id + content hash,
                                 recipe hash and resolved rules, settings, lowering,
                                 capture mode, graph hash, quantizer configs
    OUT/plan.json                the QuantPlan (portable, diffable)
    OUT/recipe.qrec              the recipe text as written
    OUT/quant_params.safetensors frozen scales / zero points / PEG permutations

``--lower int8`` artifacts are self-contained (``lowered_state``):

    OUT/model.safetensors        every tensor the lowered graph reads: integer codes as
                                 int8 / packed uint8, scales, biases, norms (float32);
                                 a tied tensor once (aliases in the JSON); the key/value
                                 cache and other run-time state are not stored (zeros)
    OUT/model/                   the source model's config.json and tokenizer files
    OUT/graph.json               the lowered graph itself (qdsl.compiler.graphfile), which
                                 the runtime loads without capturing the model again

The marker records the sha256 and size of every other file ("files"); ``read_artifact``
checks them, the JSON schemas and the cross-checks of ``qdsl.artifact.files``,
``qdsl.artifact.schema`` and ``qdsl.artifact.tensors``.

Written atomically: everything goes to a temporary sibling directory that is
renamed into place at the end, so Ctrl-C never leaves a half-written artifact.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .. import __version__
from ..atomic import atomic_dir, umasked  # the output rules: qdsl.atomic.output_dir
from .migrate import migrate
from .files import file_records, model_dir_files, read_json, regular_file, verify_files
from .schema import PLAN, check_plan, check_recipe, validate, validate_marker
from .tensors import check_quant_tensors, read_safetensors
from ..errors import ArtifactError
from ..graph.attrs import graph_tensors, param, set_tensor

MARKER = "qdsl_artifact.json"
# 2: qdsl_artifact.json records each file's sha256 and size ("files");
# 3: each activation quantizer is {"type", "spec": TensorSpec JSON} (2 and 1 are
#    still read: qdsl.artifact.migrate rewrites their quantizers from plan.json)
FORMAT_VERSION = 3
READS = (1, 2, FORMAT_VERSION)


def module_hash(model: torch.nn.Module) -> str:
    """Content hash of a model's parameters and buffers (names, shapes, dtypes, values)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.device.type != "meta":
            h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def is_artifact(path: str | os.PathLike) -> bool:
    return (Path(path) / MARKER).is_file()


def write_artifact(out: str | os.PathLike, *, meta: dict[str, Any], plan: dict[str, Any],
                   recipe_text: str, tensors: dict[str, torch.Tensor],
                   extra: dict[str, dict[str, torch.Tensor]] | None = None,
                   write_more=None, force: bool = False) -> Path:
    """Write an artifact directory; ``extra`` maps more safetensors file names to tensors;
    ``write_more(tmp_dir)`` writes any other files (model config, tokenizer)."""
    meta = {"format": "qdsl-artifact", "format_version": FORMAT_VERSION,
            "qdsl_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **meta}
    with atomic_dir(out, force=force) as tmp:
        _save(tensors, tmp / "quant_params.safetensors")
        for fname, ts in (extra or {}).items():
            _save(ts, tmp / fname)
        if write_more is not None:
            write_more(tmp)
        (tmp / "plan.json").write_text(json.dumps(plan, indent=1), encoding="utf-8")
        (tmp / "recipe.qrec").write_text(recipe_text, encoding="utf-8")
        meta["files"] = file_records(tmp, skip=MARKER)  # sha256 + size: what load verifies
        (tmp / MARKER).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return Path(out)


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' ``save_file``, and the mode ``open`` would give the file (it makes
    it 0600, unlike every other file of the artifact)."""
    save_file(tensors, str(path))
    os.chmod(path, umasked(0o666))


def read_artifact(path: str | os.PathLike, *, verify: bool = True
                  ) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """(meta, plan JSON, quantization tensors) of an artifact, after every check of
    ``qdsl.artifact.files``, ``.schema`` and ``.tensors`` (one-line ArtifactError naming
    the file on any failure).

    ``verify``: compare each file with the size and sha256 recorded at save (off:
    ``--no-verify``; the structural checks still run). A format-1 artifact (written
    before hashes were recorded) loads with a warning that it cannot be verified.
    """
    path = Path(path)
    if not (path / MARKER).is_file():
        raise ArtifactError(f"{path} is not a qdsl artifact (no {MARKER}); "
                            "make one with `qdsl compile ... -o DIR`")
    meta = read_json(path, MARKER)
    if not isinstance(meta, dict) or meta.get("format") != "qdsl-artifact" \
            or meta.get("format_version") not in READS:
        got = meta.get("format_version") if isinstance(meta, dict) else None
        raise ArtifactError(f"artifact {path}: {MARKER} is not a qdsl artifact marker this "
                            f"qdsl reads (format {got!r}; it reads "
                            f"{', '.join(map(str, READS))})")
    validate_marker(path, meta)
    reads = ["plan.json", "recipe.qrec", "quant_params.safetensors"]
    if meta["lower"] == "int8" and meta["int8"]["self_contained"]:
        reads += ["model.safetensors", "model/config.json"]
        if (path / "graph.json").exists() or (path / "graph.json").is_symlink():
            reads.append("graph.json")       # the stored graph (qdsl.compiler.graphfile)
    reads = sorted(set(reads) | set(model_dir_files(path)))
    for rel in reads:
        regular_file(path, rel)
    if "files" in meta:
        if verify:
            verify_files(path, meta["files"], reads)
    elif verify:
        warnings.warn(f"artifact {path} was written before qdsl recorded content hashes "
                      "(format 1): its files cannot be verified; recompile it to add them",
                      stacklevel=2)
    plan = read_json(path, "plan.json")
    validate(path, "plan.json", plan, PLAN)
    meta = migrate(meta, plan)  # formats 1 and 2: quantizers in the current shape
    check_plan(path, meta, plan)
    check_recipe(path, meta)
    tensors = read_safetensors(path, "quant_params.safetensors")
    check_quant_tensors(path, meta, plan, tensors)
    return meta, plan, tensors


def _state_targets(gm: torch.fx.GraphModule) -> set[str]:
    """get_attr targets an in-place op writes (key/value cache, cache counters): run-time state."""
    out = set()
    for n in gm.graph.nodes:
        op = str(n.target).split(".")
        if n.op == "call_function" and len(op) > 1 and op[1].endswith("_") and n.args:
            a = n.args[0]
            if isinstance(a, torch.fx.Node) and a.op == "get_attr":
                out.add(a.target)
    return out


def lowered_state(gm: torch.fx.GraphModule) -> tuple[dict[str, torch.Tensor], dict[str, str],
                                                     list[str]]:
    """(tensors to store, aliases {name: stored name} for shared tensors, state names)."""
    state = _state_targets(gm)
    tensors, aliases, seen = {}, {}, {}
    for k, t in graph_tensors(gm).items():
        if k in state:
            continue
        key = (t.data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape), t.stride())
        if key in seen and t.numel() > 0:
            aliases[k] = seen[key]
        else:
            seen[key], tensors[k] = k, t.detach().contiguous()
    return tensors, aliases, sorted(state)


def assign_tensors(gm: torch.fx.GraphModule, tensors: dict[str, torch.Tensor]) -> None:
    """Put stored tensors in place (``load_state_dict(assign=True)`` for the state dict,
    attribute assignment for non-persistent buffers and graph constants)."""
    keys = set(gm.state_dict(keep_vars=True))
    gm.load_state_dict({k: t for k, t in tensors.items() if k in keys}, strict=False, assign=True)
    for k, t in tensors.items():
        if k not in keys:
            set_tensor(gm, k, t)


def artifact_size(path: str | os.PathLike) -> int:
    """Bytes on disk of every file in the artifact directory."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
