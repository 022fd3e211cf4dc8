"""``--candidates`` text -> the specs the search chooses among.

Candidates are recipe specs (the grammar of a rule's right-hand side), separated by
``;``, or by ``,`` where the next piece starts a new spec: a weight width or preset
(``w4``, ``w8a8``), ``skip``, ``fp16`` / ``bf16`` / ``fp32``. So
``"w8a8, w4a16 group(128), skip"`` is three candidates and ``"w8 sym, a8 asym"`` one.
Each is checked by the recipe checker; an error is located in the candidates text
(``--candidates:1:COL``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..config.spec import ACTIVATION, WEIGHT, TensorPatch, TensorSpec, resolve
from ..errors import Diagnostic, RecipeError
from ..lang.formatter import render_meaning
from ..lang.checker import SpecMeaning
from ..lang.loader import parse_recipe

SOURCE = "--candidates"
_PREFIX = "* -> "
_STARTS = re.compile(r"\s*(w\d+(a\d+)?|skip|fp16|bf16|fp32)\b")
FLOAT = TensorPatch(bits=32)


@dataclass(frozen=True)
class Candidate:
    """One candidate: its text, the two patches it sets (a part it leaves out is float:
    ``w32`` / ``a32``) and their resolved specs (the recipe defaults applied)."""

    text: str
    weight_patch: TensorPatch
    act_patch: TensorPatch

    @property
    def weight(self) -> TensorSpec:
        return resolve(WEIGHT, self.weight_patch)

    @property
    def activation(self) -> TensorSpec:
        return resolve(ACTIVATION, self.act_patch)

    def weight_clause(self) -> str:
        return render_meaning(SpecMeaning(self.weight_patch, TensorPatch()))

    def act_clause(self) -> str:
        return render_meaning(SpecMeaning(TensorPatch(), self.act_patch))


def split(text: str) -> list[tuple[int, str]]:
    """(0-based column, text) of each candidate in ``text``."""
    out: list[tuple[int, str]] = []
    pos = 0
    for part in re.split(r"(;)", text):
        if part == ";":
            pos += 1
            continue
        cur_start, cur = pos, ""
        for i, piece in enumerate(part.split(",")):
            start = pos
            pos += len(piece) + 1
            if i and _STARTS.match(piece) and cur.strip():
                out.append((cur_start, cur))
                cur_start, cur = start, piece
            else:
                cur = f"{cur},{piece}" if i else piece
        pos -= 1
        out.append((cur_start, cur))
    return out


def _error(text: str, col: int, message: str, hint: str | None = None) -> Diagnostic:
    return Diagnostic(SOURCE, 1, col + 1, message, hint=hint, source_line=text)


def parse_candidates(text: str) -> list[Candidate]:
    """The candidates of ``text``; RecipeError with every located error."""
    errors: list[Diagnostic] = []
    out: list[Candidate] = []
    for start, raw in split(text):
        lead = len(raw) - len(raw.lstrip())
        spec = raw.strip()
        col = start + lead
        if not spec:
            errors.append(_error(text, col, "empty candidate",
                                 hint="separate specs with `;` or `,`: \"w8a8; w4a16 group(128)\""))
            continue
        try:
            recipe = parse_recipe(_PREFIX + spec, file=SOURCE)
        except RecipeError as e:
            for d in e.diagnostics:
                errors.append(Diagnostic(SOURCE, 1, col + max(d.col - len(_PREFIX), 1),
                                         d.message, hint=d.hint, source_line=text))
            continue
        rule = recipe.rules[0]
        if recipe.settings.to_json() != type(recipe.settings)().to_json() or len(recipe.rules) != 1:
            errors.append(_error(text, col, f"`{spec}` is not one spec"))
            continue
        w = FLOAT if rule.skip or rule.weight.bits is None and rule.weight.float_dtype is None \
            else rule.weight
        a = FLOAT if rule.skip or rule.activation.bits is None and \
            rule.activation.float_dtype is None else rule.activation
        if w.rounding is not None and type(w.rounding).__name__ != "RTN":
            errors.append(_error(text, col, f"`{spec}`: GPTQ / AWQ rounding is not searched",
                                 hint="the score prices round-to-nearest; add `gptq` / `awq` "
                                      "to the found recipe's rules by hand"))
            continue
        cand = Candidate(spec, w, a)
        try:
            cand.weight, cand.activation
        except ValueError as e:  # SpecError: fields that do not fit once resolved
            errors.append(_error(text, col, f"`{spec}`: {e}"))
            continue
        if any(c.weight == cand.weight and c.activation == cand.activation for c in out):
            errors.append(_error(text, col, f"`{spec}` repeats an earlier candidate"))
            continue
        out.append(cand)
    if errors:
        raise RecipeError(errors)
    if not out:
        raise RecipeError([_error(text, 0, "no candidates",
                                  hint="e.g. --candidates \"w8a8; w4a16 group(128)\"")])
    return out
