"""``--transforms`` text -> the transform prefixes the search chooses among.

Options are separated by ``;``; each is ``none`` (the model as it is) or recipe
transform statements as a recipe writes them (``rotate``), several on one option
separated by ``,``. Each option is searched on its own transformed graph (the
statements applied exactly as ``qdsl compile`` applies them, before any observer), and
the search keeps the option whose found recipe has the lowest measured loss (predicted,
with ``--no-measure``); the written recipe starts with that option's statements.

Only calibration-free transforms are searched: ``rotate`` (float-equivalent, needs no
data). ``smooth`` takes its scales from a calibration pass of its own and is refused
with a located error (``--transforms:1:COL``), as is a rule or a setting.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import Diagnostic, GraphError, RecipeError
from ..lang.loader import parse_recipe
from ..passes.rotate import rotate
from ..plan import build_plan

SOURCE = "--transforms"
SEARCHABLE = ("rotate",)


@dataclass(frozen=True)
class TransformOption:
    """One option: its label (``none``, ``rotate``) and its statements (recipe lines)."""

    label: str
    statements: tuple[str, ...] = ()
    col: int = 1            # 1-based column of the option in the --transforms text

    @property
    def recipe_text(self) -> str:
        return "".join(f"{s}\n" for s in self.statements)


NONE = TransformOption("none")


def _error(text: str, col: int, message: str, hint: str | None = None) -> Diagnostic:
    return Diagnostic(SOURCE, 1, col + 1, message, hint=hint, source_line=text)


def parse_transforms(text: str) -> list[TransformOption]:
    """The options of ``text``; RecipeError with every located error."""
    errors: list[Diagnostic] = []
    out: list[TransformOption] = []
    pos = 0
    for part in text.split(";"):
        col = pos + len(part) - len(part.lstrip())
        pos += len(part) + 1
        body = part.strip()
        if not body:
            errors.append(_error(text, col, "empty transform option",
                                 hint='e.g. --transforms "none; rotate"'))
            continue
        if body == "none":
            opt = NONE
        else:
            pieces, starts, at = part.split(","), [], pos - len(part) - 1
            for piece in pieces:   # 0-based column of each statement in ``text``
                starts.append(at + len(piece) - len(piece.lstrip()))
                at += len(piece) + 1
            stmts = tuple(x.strip() for x in pieces)
            try:
                recipe = parse_recipe("\n".join(stmts) + "\n", file=SOURCE)
            except RecipeError as e:   # line k of the parsed text is statement k
                errors.extend(Diagnostic(SOURCE, 1, starts[min(d.line, len(starts)) - 1]
                                         + max(d.col, 1), d.message, hint=d.hint,
                                         source_line=text) for d in e.diagnostics)
                continue
            kinds = [t.kind for t in recipe.transforms]
            if recipe.rules or not kinds:
                errors.append(_error(text, col, f"`{body}` is not a transform statement",
                                     hint="an option is `none` or statements such as `rotate`"))
                continue
            bad = [k for k in kinds if k not in SEARCHABLE]
            if bad:
                errors.append(_error(
                    text, col, f"`{bad[0]}` is not searched",
                    hint=f"searchable: {', '.join(SEARCHABLE)}; smooth takes its scales from a "
                         "calibration pass of its own: add it to the found recipe by hand"))
                continue
            opt = TransformOption(" + ".join(stmts), stmts, col + 1)
        if any(o.label == opt.label for o in out):
            errors.append(_error(text, col, f"`{body}` repeats an earlier option"))
            continue
        out.append(opt)
    if errors:
        raise RecipeError(errors)
    return out


def apply(option: TransformOption, gm, named):
    """``named`` after ``option``'s statements are applied to ``gm`` (in place) as the
    compile pipeline applies them; GraphError (naming the node) where one does not fit."""
    if not option.statements:
        return named
    plan = build_plan(parse_recipe(option.recipe_text, file=SOURCE), named)
    try:
        return rotate(gm, named, plan)   # the pass itself, as compile runs it
    except GraphError as e:   # located in the option text, not in the parsed statement
        msg = str(e).replace(f"{SOURCE}:1:1", f"{SOURCE}:1:{option.col}")
        raise GraphError(msg, node=e.node, hint=e.hint) from None
