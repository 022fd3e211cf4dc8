"""``set export = gguf | compressed_tensors`` on a plan: each node's export verdict
(``qdsl explain --format json``: the ``export`` key) and the located errors that
``explain`` and ``compile`` report before any data. The per-spec rules are
``qdsl.lang.exportrules``'; this adds what needs the model: activations that are
not a quantized linear's input (compressed-tensors quantizes nothing else), int8
GEMMs over group-wise weights, and the q/k/v and gate/up shards vLLM fuses into one
layer, which must share one scheme. (GGUF rows that are not a multiple of the
32-column block: ``validate_plan`` already refuses a group(size=32) that does not
divide them, naming the node.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config.spec import ACTIVATION, WEIGHT, GroupWise
from ..errors import Diagnostic
from ..lang.exportrules import CT, spec_problems
from ..passes.int8_exec import weight_inputs

FUSED = (("attn.q", "attn.k", "attn.v"), ("mlp.gate", "mlp.up"))


def export_verdicts(gm: torch.fx.GraphModule, named, plan, fmt: str) -> dict[str, list[dict]]:
    """canonical name -> its problems (``tensor``, ``attribute``, ``message``, ``hint``);
    an empty list: the node exports as it is."""
    inputs = weight_inputs(gm, named, plan)
    fed = {v[1] for v in inputs.values() if v[0] == "linear" and v[1] is not None}
    out: dict[str, list[dict]] = {}
    for node in named.nodes:
        e = plan[node.name]
        probs = [(WEIGHT, *p) for p in (spec_problems(fmt, WEIGHT, e.weight) if e.weight else [])]
        probs += [(ACTIVATION, *p) for p in spec_problems(fmt, ACTIVATION, e.activation)]
        if e.weight is not None and e.weight.quantized:
            kind, _, in_spec, _ = inputs.get(node.name, (None, None, None, None))
            if (fmt == CT and kind == "linear" and e.weight.bits == 8 and in_spec is not None
                    and in_spec.quantized and isinstance(e.weight.granularity, GroupWise)):
                probs.append((WEIGHT, "granularity", "vLLM's int8 x int8 GEMM takes per-channel "
                              "or per-tensor weight scales, not groups", "w8 sym per_channel"))
        if fmt == CT and e.activation.quantized and node.name not in fed:
            probs.append((ACTIVATION, "bits", f"compressed-tensors quantizes only the inputs of "
                          f"quantized linears; this {node.role} output is not one",
                          "no activation spec for this node"))
        out[node.name] = [dict(zip(("tensor", "attribute", "message", "hint"), p)) for p in probs]
    if fmt == CT:
        _fused(named, plan, out)
    return out


def _fused(named, plan, out: dict[str, list[dict]]) -> None:
    for b in range(named.blocks):
        for shards in FUSED:
            names = [f"block.{b}.{s}" for s in shards if f"block.{b}.{s}" in named.by_name]
            if len(names) < 2:
                continue
            first = plan[names[0]].weight
            for n in names[1:]:
                if plan[n].weight != first:
                    short = [s.split(".", 2)[2] for s in names]
                    out[n].append({"tensor": WEIGHT, "attribute": "bits", "hint":
                                   f"give {' / '.join(short)} one spec",
                                   "message": f"vLLM fuses {', '.join(short)} into one layer; "
                                              f"{n.split('.', 2)[2]} is {_describe(plan[n].weight)}"
                                              f", {short[0]} {_describe(first)}"})


def _describe(spec) -> str:
    return spec.describe() if spec is not None else "float"


def export_diagnostics(verdicts: dict[str, list[dict]], plan, fmt: str,
                       recipe_text: str = "", recipe_file: str = "") -> list[Diagnostic]:
    """The problems as located errors at the rule that decided each attribute, one
    per (rule, message), naming the first node and how many more it covers."""
    seen: dict[tuple, list[str]] = {}
    for name, probs in verdicts.items():
        e = plan[name]
        for p in probs:
            loc = e.decided_by.get(p["tensor"], {}).get(p["attribute"]) or e.rule(p["tensor"])
            seen.setdefault((loc, p["message"], p["hint"]), []).append(name)
    out = []
    for (loc, message, hint), names in seen.items():
        file, line, col = _split(loc, recipe_file)
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        out.append(Diagnostic(file, line, col, f"`set export = {fmt}`: node {names[0]}{more}: "
                              f"{message}", hint=hint,
                              source_line=_line(file, line, recipe_text, recipe_file)))
    return sorted(out, key=lambda d: (d.file, d.line, d.col))


def _split(loc: str, default: str) -> tuple[str, int, int]:
    if loc == "-":
        return default or "<recipe>", 1, 1
    file, line, col = loc.rsplit(":", 2)
    return file, int(line), int(col)


def _line(file: str, line: int, text: str, source: str) -> str:
    lines = text.splitlines() if file == source else []
    if not lines:
        try:
            lines = Path(file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return ""
    return lines[line - 1] if 0 < line <= len(lines) else ""


def verdict_rows(verdicts: dict[str, list[dict]], fmt: str) -> dict[str, Any]:
    """canonical name -> the ``export`` key of ``qdsl explain --format json``."""
    return {n: {"format": fmt, "ok": not p, "problems": p} for n, p in verdicts.items()}
