"""Export a compiled artifact to a format other runtimes serve: GGUF (llama.cpp,
ollama, LM Studio) and compressed-tensors (vLLM). docs/export.md.

    qdsl.export.export("out/q", "gguf", "model.gguf")

Reads the artifact through ``qdsl.compiler.loading`` (every artifact check runs)
and writes qdsl's own codes and scales; nothing is re-quantized unless asked.
"""

from __future__ import annotations

import os
from typing import Any

from ..artifact.store import read_artifact
from ..compiler.build import as_model
from ..compiler.loading import load
from ..compiler.source import local_source
from ..errors import ExportError
from .ctwrite import write_compressed_tensors
from .ggufwrite import write_gguf

FORMATS = ("gguf", "compressed-tensors")


def export(artifact: str | os.PathLike, fmt: str, out: str | os.PathLike, *,
           model: Any = None, requantize: bool = False, vocab: bool = True,
           verify: bool = True, force: bool = False) -> dict:
    """Write ``artifact`` as ``fmt`` to ``out`` (a .gguf file, or a directory for
    compressed-tensors); returns a report of what was written. ``model``: the source
    model (default: the one the artifact records, if it is on this machine)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; formats: {', '.join(FORMATS)}")
    if model is None:
        meta, _, _ = read_artifact(artifact, verify=verify)
        model = local_source(meta["model"]["id"], artifact)
    m, tok, _ = as_model(model)
    q = load(artifact, m, verify=verify)
    if fmt == "gguf":
        return write_gguf(q, m.config, tok, out, requantize=requantize, vocab=vocab)
    return write_compressed_tensors(q, m.config, tok, out, force=force)
