"""Compiled artifacts: a directory of safetensors + JSON, never pickle.

    OUT/qdsl_artifact.json       what it is: qdsl version, source model id + content hash,
                                 recipe hash and resolved rules, settings, lowering,
                                 capture mode, graph hash, quantizer configs
    OUT/plan.json                the QuantPlan (portable, diffable)
    OUT/recipe.qrec              the recipe text as written
    OUT/quant_params.safetensors frozen scales / zero points / PEG permutations

Written atomically: everything goes to a temporary sibling directory that is
renamed into place at the end, so Ctrl-C never leaves a half-written artifact.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .errors import ArtifactError

MARKER = "qdsl_artifact.json"
FORMAT_VERSION = 1


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


@contextmanager
def atomic_dir(out: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` only if the block completes."""
    out = Path(out)
    if out.exists() and not force:
        raise ArtifactError(f"{out} exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_artifact(out: str | os.PathLike, *, meta: dict[str, Any], plan: dict[str, Any],
                   recipe_text: str, tensors: dict[str, torch.Tensor],
                   extra: dict[str, dict[str, torch.Tensor]] | None = None,
                   force: bool = False) -> Path:
    """Write an artifact directory; ``extra`` maps more safetensors file names to tensors."""
    meta = {"format": "qdsl-artifact", "format_version": FORMAT_VERSION,
            "qdsl_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **meta}
    with atomic_dir(out, force=force) as tmp:
        save_file(tensors, str(tmp / "quant_params.safetensors"))
        for fname, ts in (extra or {}).items():
            save_file(ts, str(tmp / fname))
        (tmp / "plan.json").write_text(json.dumps(plan, indent=1))
        (tmp / "recipe.qrec").write_text(recipe_text)
        (tmp / MARKER).write_text(json.dumps(meta, indent=1))
    return Path(out)


def read_artifact(path: str | os.PathLike) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """(meta, plan JSON, quantization tensors) of an artifact; clear errors if malformed."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise ArtifactError(f"{path} is not a qdsl artifact (no {MARKER}); "
                            "make one with `qdsl compile ... -o DIR`")
    try:
        meta = json.loads((path / MARKER).read_text())
        plan = json.loads((path / "plan.json").read_text())
        tensors = load_file(str(path / "quant_params.safetensors"))
    except (OSError, ValueError) as e:
        raise ArtifactError(f"artifact {path} is incomplete or corrupt: {e}") from e
    if meta.get("format") != "qdsl-artifact" or meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"artifact {path} has format {meta.get('format')!r} "
                            f"v{meta.get('format_version')}; this qdsl reads v{FORMAT_VERSION}")
    return meta, plan, tensors


def artifact_size(path: str | os.PathLike) -> int:
    """Bytes on disk of every file in the artifact directory."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def load_artifact_lm(path: str | os.PathLike, model=None):
    """An artifact as a ``CausalLM`` (see ``qdsl.compiler.load_artifact_lm``)."""
    from .compiler import load_artifact_lm as _load

    return _load(path, model)
