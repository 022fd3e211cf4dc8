"""The planner's diagnostics: located errors and warnings about recipe rules (a rule
whose settings are all overridden later, options on tensors that stay float)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from ..errors import Diagnostic
from ..config.recipe import Loc, Recipe, Rule
from ..config.spec import ACTIVATION, FLOAT_BITS, PRECISION, WEIGHT, TensorPatch
from ..lang.loader import read_text

_SKIP = TensorPatch(bits=FLOAT_BITS)  # what `skip` sets on both tensors


def _line_of(loc: Loc, recipe: Recipe) -> str:
    text = recipe.text if loc.file == recipe.source else None
    if text is None:  # an included file: read it as the loader does (regular, capped)

        text = read_text(Path(loc.file))[0]
        if text is None:
            return ""
    lines = text.splitlines()
    return lines[loc.line - 1] if 0 < loc.line <= len(lines) else ""


def _diag(rule: Rule, recipe: Recipe, message: str, severity: str = "error",
          hint: str | None = None) -> Diagnostic:
    loc = rule.loc
    return Diagnostic(loc.file, loc.line, loc.col, message, severity=severity, hint=hint,
                      source_line=_line_of(loc, recipe))


def _patches(rule: Rule) -> dict[str, TensorPatch]:
    if rule.selector.port is not None:  # `.input`: only the producer's output activation
        return {ACTIVATION: _SKIP if rule.skip else rule.activation}
    if rule.skip:
        return {WEIGHT: _SKIP, ACTIVATION: _SKIP}
    return {WEIGHT: rule.weight, ACTIVATION: rule.activation}


def _overriders(i: int, rule: Rule, hits: list, owner) -> set[int] | None:
    """The later rules that override everything rule i sets on its nodes, or None
    when at least one of its settings survives."""
    winners: set[int] = set()
    for n in hits:
        for kind, patch in _patches(rule).items():
            if kind == WEIGHT and not n.has_weight:
                continue
            mine = owner[n.name][kind]
            for f in patch.set_fields():  # a replaced precision: its replacer owns it
                w = mine[f] if f in mine else next(mine[p] for p in PRECISION if p in mine)
                if w == i:
                    return None
                winners.add(w)
    return winners


def _shadowed(recipe: Recipe, matched: list[list], owner) -> Iterable[Diagnostic]:
    """Warnings for rules all of whose (node, tensor, attribute) settings are overridden."""
    for i, rule in enumerate(recipe.rules):
        winners = _overriders(i, rule, matched[i], owner) if matched[i] else None
        if not winners:
            continue
        by = ", ".join(
            f"line {recipe.rules[w].loc.line}" + (
                f" of {recipe.rules[w].loc.file}" if recipe.rules[w].loc.file != rule.loc.file
                else "") for w in sorted(winners))
        yield _diag(rule, recipe, f"rule `{rule.selector.text()}` is shadowed: everything it sets "
                    f"on the {len(matched[i])} node(s) it matches is overridden by {by}",
                    severity="warning",
                    hint="remove it, or move it after the rules that override it")


def _ineffective(recipe: Recipe, matched: list[list], entries: dict
                 ) -> Iterable[Diagnostic]:
    """Warnings for options (granularity, observer ...) on tensors that stay float because
    no rule gives them bits: `mlp.c_fc -> per_group(K=8)` alone quantizes nothing."""
    for i, rule in enumerate(recipe.rules):
        for kind, patch in ((WEIGHT, rule.weight), (ACTIVATION, rule.activation)):
            opts = [f for f in patch.set_fields() if f not in PRECISION]
            if rule.skip or not opts or patch.bits is not None:
                continue
            specs = [getattr(entries[n.name], kind) for n in matched[i]]
            specs = [s for s in specs if s is not None]
            if specs and not any(s.quantized for s in specs):
                yield _diag(rule, recipe, f"{kind} options ({', '.join(opts)}) have no effect: "
                            f"the {kind}s of the {len(specs)} node(s) this rule matches stay "
                            "float, as no rule gives them bits", severity="warning",
                            hint=f"add bits here (e.g. `{kind[0]}8`) or in an earlier rule")
