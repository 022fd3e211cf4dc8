"""Older artifact formats read as the current one.

Format 3 records every activation quantizer as its module type and the
``TensorSpec`` it runs, in the spec's own JSON (``{"type", "spec"}``, as the runtime
modules serialise themselves). Formats 1 and 2 recorded a static ``FakeQuant`` as
``{"type", "bits", "symmetric"}`` and a ``FloatCast`` as ``{"type", "float_dtype"}``
(``DynamicFakeQuant`` already held its spec). ``migrate`` rewrites those entries
from the artifact's own plan.json: the node's planned activation spec with the fields
the old entry recorded laid over it, so an entry that disagreed with its plan still
disagrees, and ``schema.check_plan`` refuses it as it refused it before. The tensors
(quant_params.safetensors, model.safetensors) did not change between the formats.
"""

from __future__ import annotations

from typing import Any

from ..config.spec import ACTIVATION, TensorSpec

# the fields each old entry recorded, by type (DynamicFakeQuant: its whole spec already)
OLD_FIELDS = {"FakeQuant": ("bits", "symmetric"), "FloatCast": ("float_dtype",)}


def migrate(meta: dict[str, Any], plan: dict[str, Any]) -> dict[str, Any]:
    """``meta`` (a validated marker of format 1 or 2; format 3 is returned as it is)
    with its activation quantizers in the format-3 shape. ``plan``: the artifact's
    validated plan.json. ``meta["format_version"]`` keeps the version on disk."""
    if meta["format_version"] >= 3:
        return meta
    planned = {e["name"]: e["activation"] for e in plan["entries"]}
    acts = {k: _module_v2(c, planned.get(k))
            for k, c in meta["quantizers"]["activations"].items()}
    return {**meta, "quantizers": {**meta["quantizers"], "activations": acts}}


def _module_v2(config: dict[str, Any], planned: dict[str, Any] | None) -> dict[str, Any]:
    if config["type"] not in OLD_FIELDS:
        return config
    # a node the plan lacks: a default spec (check_plan then names the stray quantizer)
    base = planned if planned is not None else TensorSpec(ACTIVATION, None).to_json()
    spec = {**base, **{k: config[k] for k in OLD_FIELDS[config["type"]]}}
    if config["type"] == "FloatCast":
        spec["bits"] = None
    return {"type": config["type"], "spec": spec}
