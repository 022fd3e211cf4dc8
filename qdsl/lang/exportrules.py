"""What ``set export = gguf | compressed_tensors`` allows: the checks of a recipe
against the format it will be exported to, before any data (docs/export.md).

Two levels, one table of messages:

* ``rule_diagnostics`` (``qdsl check``, no model): every rule whose own attributes
  (precision, symmetry, granularity, activation spec) the format cannot carry, as a
  located error at the rule;
* ``spec_problems`` (``qdsl explain`` / ``compile``, with the plan): the resolved
  spec of each node, plus what needs the model (``qdsl.compiler.exportcheck``: rows
  that are not a multiple of GGUF's blocks, activations that are not a linear's
  input, fused q/k/v or gate/up shards with different specs).

A problem is ``(attribute, message, hint)``; the attribute names the rule to blame
(``decided_by`` in the plan).
"""

from __future__ import annotations

from typing import Callable

from ..config.recipe import Rule
from ..config.spec import (ACTIVATION, FLOAT_BITS, WEIGHT, GroupWise, PerChannel, PerGroup,
                           PerTensor, TensorPatch, format_option)
from ..errors import Diagnostic

GGUF, CT = "gguf", "compressed-tensors"
GGUF_BLOCK = 32
VLLM_GROUPS = (32, 64, 128)       # group sizes vLLM's Marlin / Machete kernels take
Problem = tuple[str, str, str]    # (attribute, message, hint)


def _quantized(p) -> bool:
    """A TensorSpec's ``quantized``; for a TensorPatch, whether it sets integer bits."""
    if not isinstance(p, TensorPatch):
        return p.quantized
    return p.bits is not None and p.bits != FLOAT_BITS and p.float_dtype is None


def spec_problems(fmt: str, kind: str, spec) -> list[Problem]:
    """A TensorPatch or a resolved TensorSpec (same fields) against ``fmt``; fields a
    patch leaves unset are not judged."""
    g = spec.granularity
    if kind == ACTIVATION and isinstance(g, PerGroup) and not _quantized(spec):
        # PEG set on its own (`mlp.c_fc -> w8 per_group(K=8)`): the bits come from elsewhere
        return [("granularity", f"{format_option(g)} (PEG) activation quantization cannot be "
                                f"exported to {fmt}", "per_token, or no activation spec")]
    if not _quantized(spec):
        return []
    bits, sym = spec.bits, spec.symmetric
    out: list[Problem] = []
    if kind == ACTIVATION:
        what = f"a{bits}" + (f" {format_option(g)}" if g is not None else "")
        if fmt == GGUF:
            return [("bits", f"llama.cpp runs activations in float (it rounds a linear's input "
                             f"to its own 8-bit blocks at run time, not configurable): {what} "
                             "cannot be exported to GGUF",
                     "drop the activation spec (weight-only), or "
                     "`set export = compressed_tensors`")]
        if bits != 8:
            out.append(("bits", f"compressed-tensors quantizes linear inputs to 8 bits: {what} "
                                "cannot be exported", "a8 sym per_token dynamic"))
        if isinstance(g, PerGroup):
            out.append(("granularity", f"{format_option(g)} (PEG) has no compressed-tensors "
                                       "input scheme (per_tensor or per_token only)",
                        "a8 sym per_token dynamic"))
        return out
    if fmt == GGUF:
        if bits > 8:
            out.append(("bits", f"GGUF carries integer weights as 4- or 8-bit blocks (Q4_0, "
                                f"Q4_1, Q8_0): w{bits} cannot be exported",
                         "w8 sym group(size=32)"))
        elif sym is False and bits > 4:
            out.append(("symmetric", f"GGUF has no {bits}-bit block with a zero point (Q4_1 is "
                                     "4 bits)", "w8 sym group(size=32)"))
        if g is not None and g != GroupWise(GGUF_BLOCK):
            out.append(("granularity", f"GGUF blocks are {GGUF_BLOCK} input columns with one "
                                       f"fp16 scale each: {format_option(g)} cannot be exported",
                        f"group(size={GGUF_BLOCK})"))
        return out
    if bits not in (4, 8):
        out.append(("bits", f"vLLM's compressed-tensors kernels take 4- or 8-bit integer "
                            f"weights: w{bits} cannot be exported", "w4 or w8"))
    if isinstance(g, GroupWise) and g.size not in VLLM_GROUPS:
        out.append(("granularity", f"vLLM's kernels take weight groups of 32, 64 or 128 "
                                   f"columns: {format_option(g)} cannot be exported",
                    "group(size=128) or per_channel"))
    elif g is not None and not isinstance(g, (GroupWise, PerChannel, PerTensor)):
        out.append(("granularity", f"{format_option(g)} is not a compressed-tensors weight "
                                   "strategy", "per_channel"))
    return out


def rule_problems(fmt: str, rule: Rule, granularity_set: bool) -> list[Problem]:
    """What ``rule`` itself sets that ``fmt`` cannot carry. ``granularity_set``: an
    earlier rule set a weight granularity (else a quantizing rule without one leaves
    the default per_channel, which GGUF cannot carry)."""
    if rule.skip:
        return []
    out = [*spec_problems(fmt, WEIGHT, rule.weight),
           *spec_problems(fmt, ACTIVATION, rule.activation)]
    w = rule.weight
    if (fmt == GGUF and _quantized(w) and w.bits <= 8 and w.granularity is None
            and not granularity_set):
        out.append(("granularity", f"w{w.bits} without a granularity is per_channel, which "
                                   "GGUF's 32-column blocks cannot carry",
                    f"write w{w.bits} sym group(size={GGUF_BLOCK})"))
    if (fmt == CT and _quantized(w) and w.bits == 8 and isinstance(w.granularity, GroupWise)
            and _quantized(rule.activation)
            and not isinstance(rule.activation.granularity, PerGroup)):
        out.append(("granularity", "vLLM's int8 x int8 GEMM takes per-channel or per-tensor "
                                   "weight scales, not groups", "w8 sym per_channel"))
    return out


def rule_diagnostics(rules: list[Rule], fmt: str,
                     source: Callable[[str, int], str]) -> list[Diagnostic]:
    """Every rule the export format cannot carry, as located errors (``qdsl check``)."""
    out, granularity_set = [], False
    for rule in rules:
        for _, message, hint in rule_problems(fmt, rule, granularity_set):
            out.append(Diagnostic(rule.loc.file, rule.loc.line, rule.loc.col,
                                  f"`set export = {fmt}`: {message}", hint=hint,
                                  source_line=source(rule.loc.file, rule.loc.line)))
        granularity_set |= rule.weight.granularity is not None
    return out
