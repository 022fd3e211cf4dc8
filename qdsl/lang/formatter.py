"""Canonical formatting of .qrec text.

Rules are printed from their checked meaning, so the output re-parses to the
same ``Recipe``: the weight clause, then ``, ``, then the activation clause,
each in the order bits, float type, symmetry, granularity, observer, mode, rounding
(``w8 sym per_channel mse, a8 asym per_tensor minmax static``). A preset word
is kept (``w8a8 dynamic``). Comments are kept (full-line ones with their
indentation, trailing ones aligned within a block of rules), runs of blank
lines become one, and ``->`` is aligned within a block of consecutive rules.
"""

from __future__ import annotations

import re

from ..errors import RecipeError
from ..config.recipe import Rule, Transform
from ..config.spec import ACTIVATION, GRANULARITIES, WEIGHT, TensorPatch, format_option
from .checker import SpecMeaning, check_document
from .parser import parse_document, quote
from .presets import preset_text
from .syntax import BlankLine, CommentLine, IncludeLine, RuleLine, SettingLine, TransformLine

ALIGN_MAX = 40  # selectors longer than this do not widen their block's `->` column
COMMENT_MAX = 80  # trailing comments align at most at this column


def format_text(text: str, file: str = "<string>") -> str:
    """Canonical form of recipe text; raises ``RecipeError`` if the text has errors
    (includes are not followed: formatting is per file)."""
    doc, diags = parse_document(text, file)
    items, check_diags, meanings = check_document(doc)
    transforms = {t.loc.line: t for t in items if isinstance(t, Transform)}
    errors = [d for d in [*diags, *check_diags] if d.severity == "error"]
    if errors:
        raise RecipeError(errors)
    out: list[str] = []
    block: list[tuple[str, str, str | None] | str] = []  # rules: (selector, spec, comment)

    def flush() -> None:
        out.extend(_render_block(block))
        block.clear()

    for node in doc.lines:
        if isinstance(node, RuleLine):
            block.append((node.selector.text(), render_meaning(meanings[node.line]),
                          node.comment))
            continue
        if isinstance(node, CommentLine):
            text_line = doc.source_line(node.line).rstrip()
            if block:
                block.append(text_line)
            else:
                out.append(text_line)
            continue
        flush()
        if isinstance(node, BlankLine):
            if out and out[-1] != "":
                out.append("")
        elif isinstance(node, SettingLine):
            out.append(_with_comment(f"set {node.key} = {_value(node)}", node.comment))
        elif isinstance(node, IncludeLine):
            out.append(_with_comment(f"include {quote(node.path)}", node.comment))
        elif isinstance(node, TransformLine):
            out.append(_with_comment(transforms[node.line].text(), node.comment))
    flush()
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n" if out else ""


def _render_block(block: list) -> list[str]:
    rules = [b for b in block if isinstance(b, tuple)]
    width = max((len(s) for s, _, _ in rules if len(s) <= ALIGN_MAX), default=0)
    codes = [f"{s.ljust(width)} -> {spec}" for s, spec, _ in rules]
    ccol = max((len(c) for c, (_, _, com) in zip(codes, rules) if com and len(c) < COMMENT_MAX),
               default=0) + 2
    lines, i = [], 0
    for b in block:
        if isinstance(b, str):
            lines.append(b)
            continue
        code, comment = codes[i], b[2]
        i += 1
        if comment:
            code = code.ljust(ccol) + comment if len(code) + 2 <= ccol else f"{code}  {comment}"
        lines.append(code)
    return lines


def _with_comment(code: str, comment: str | None) -> str:
    return f"{code}  {comment}" if comment else code


def _value(node: SettingLine) -> str:
    if node.value_kind == "string":
        return quote(str(node.value))
    if isinstance(node.value, float):  # the shortest exact form, exponent unpadded: 5e-5
        return re.sub(r"e([+-])0+(\d)", r"e\1\2", repr(node.value))
    return str(node.value)


# --------------------------------------------------------------------------
# Specs.


def render_rule(rule: Rule, preset: str | None = None) -> str:
    """``SELECTOR -> SPEC`` of a checked rule."""
    meaning = SpecMeaning(rule.weight, rule.activation, rule.skip, preset)
    return f"{rule.selector.text()} -> {render_meaning(meaning)}"


def render_meaning(m: SpecMeaning) -> str:
    """Canonical spec text whose parse gives back ``m`` exactly."""
    if m.skip:
        return "skip"
    w, a = m.weight, m.activation
    if m.preset is None and w == a and w.float_dtype and \
            w == TensorPatch(float_dtype=w.float_dtype):
        return w.float_dtype  # `fp16`: both kinds, nothing else
    if m.preset is not None and preset_text(m.preset) == f"w{w.bits}, a{a.bits}":
        wparts = _clause(WEIGHT, w, bind=False)
        aparts = _clause(ACTIVATION, a, bind=False)
        head = " ".join([m.preset, *wparts])
        return f"{head}, {' '.join(aparts)}" if wparts and aparts else \
            " ".join([head, *aparts])
    wparts, aparts = _clause(WEIGHT, w, True), _clause(ACTIVATION, a, True)
    if not wparts or not aparts:
        return " ".join(wparts or aparts)
    # `w8 per_group(K=8)` reads as one clause; `w8, a8` / `w8, a.sym` as two
    sep = ", " if aparts[0].startswith("a") else " "
    return " ".join(wparts) + sep + " ".join(aparts)


def _clause(kind: str, p: TensorPatch, bind: bool) -> list[str]:
    """Options of one tensor kind. With ``bind`` and bits set, the bits word comes first
    and makes the kind current (no prefixes needed); otherwise options valid for both
    kinds carry a `w.` / `a.` prefix."""
    letter = "w" if kind == WEIGHT else "a"
    current = bind and p.bits is not None
    pre = "" if current else f"{letter}."
    parts = [f"{letter}{p.bits}"] if current else []
    if p.float_dtype is not None:
        parts.append(pre + p.float_dtype)
    if p.symmetric is not None:
        parts.append(pre + ("sym" if p.symmetric else "asym"))
    if p.granularity is not None:
        both = len(GRANULARITIES[p.granularity.name].kinds) == 2
        parts.append((pre if both else "") + format_option(p.granularity))
    if p.observer is not None:
        parts.append(pre + format_option(p.observer))
    if p.dynamic is not None:
        parts.append("dynamic" if p.dynamic else "static")
    if p.rounding is not None:
        parts.append(format_option(p.rounding))
    return parts
