"""Layer reduction: which teacher blocks a student keeps (``set student.blocks``).

XTC / de Moor 2023 initialise a shallower student with a subset of the teacher's
blocks and train it by distillation against the teacher. The setting names the
subset, either by a rule or as an explicit list of 0-based teacher block indices:

* ``every_other`` — the odd blocks ``1, 3, 5, ...`` (12 blocks -> ``1, 3, ..., 11``,
  the seed's set: the top block is kept); the rule XTC found best.
* ``bottom_half`` / ``top_half`` — blocks ``0 .. n/2 - 1`` / ``n/2 .. n - 1`` (the
  alternatives XTC compared).
* ``"1,3"`` — an explicit list (a quoted string), strictly increasing.

Student block ``i`` is initialised from teacher block ``map[i]`` and, in distillation,
its output hidden state and attention are matched to teacher block ``map[i]``'s
(the embeddings to the embeddings). Torch-free: the checker validates the text,
``student_map`` checks it against a model's block count.
"""

from __future__ import annotations

import re

from ..errors import Diagnostic, RecipeError

RULES = ("every_other", "bottom_half", "top_half")


class StudentError(ValueError):
    """A ``student.blocks`` value that is malformed or does not fit the model."""


def parse_blocks(value: str) -> str | tuple[int, ...]:
    """A rule name, or the explicit list as a tuple; StudentError on bad text."""
    v = value.strip()
    if v in RULES:
        return v
    if not re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*", v):
        raise StudentError(f"`student.blocks` must be one of {', '.join(RULES)} or a quoted "
                           f"list of block indices like \"1,3\", got `{value}`")
    blocks = tuple(int(x) for x in v.split(","))
    if list(blocks) != sorted(set(blocks)):
        raise StudentError(f"`student.blocks` lists blocks in increasing order without "
                           f"repeats, got `{value}`")
    return blocks


def student_map(value: str, n_blocks: int) -> tuple[int, ...]:
    """The teacher block each student block starts from, for a teacher of ``n_blocks``.

    >>> student_map("every_other", 4), student_map("every_other", 12)
    ((1, 3), (1, 3, 5, 7, 9, 11))
    >>> student_map("bottom_half", 4), student_map("top_half", 5), student_map("0,2", 4)
    ((0, 1), (3, 4), (0, 2))
    """
    rule = parse_blocks(value)
    if rule == "every_other":
        blocks = tuple(range(1, n_blocks, 2))
    elif rule == "bottom_half":
        blocks = tuple(range(n_blocks // 2))
    elif rule == "top_half":
        blocks = tuple(range(n_blocks - n_blocks // 2 if n_blocks > 1 else 0, n_blocks))
    else:
        bad = [b for b in rule if b >= n_blocks]
        if bad:
            raise StudentError(f"`student.blocks` names block {bad[0]}, but the model has "
                               f"{n_blocks} blocks, numbered 0 to {n_blocks - 1}")
        blocks = rule
    if not blocks:
        raise StudentError(f"`student.blocks = {value}` keeps no block of a "
                           f"{n_blocks}-block model")
    return blocks


def student_value(value, kind: str) -> str:
    """``set student.blocks = VALUE`` checked (a word, a quoted list or one number):
    the text kept in the recipe; StudentError (a ValueError) says what is wrong."""
    parse_blocks(str(value))
    return str(value)


def weight_value(value, kind: str) -> float:
    """``set train.logits|hidden|attn|dampen = NUMBER`` (a loss weight >= 0) checked."""
    if kind != "number" or not 0 <= value < float("inf"):
        raise ValueError(f"a loss weight must be a number >= 0, got `{value}`")
    return float(value)


def lr_value(value, kind: str) -> float:
    """``set train.lr = NUMBER`` (the peak learning rate, > 0) checked."""
    if kind != "number" or not 0 < value < float("inf"):
        raise ValueError(f"a learning rate must be a number > 0, got `{value}`")
    return float(value)


def fraction_value(value, kind: str) -> float:
    """``set train.warmup|freeze = NUMBER`` (a fraction, 0 to 1) checked."""
    if kind != "number" or not 0 <= value <= 1:
        raise ValueError(f"expected a fraction from 0 to 1, got `{value}`")
    return float(value)


def setting_position(text: str, key: str = "student.blocks") -> tuple[int, int, str]:
    """(line, column of the value, line text) of the last ``set KEY = ...`` in ``text``;
    (1, 1, "") when the setting came from an included file."""
    found = (1, 1, "")
    pat = re.compile(r"^\s*set\s+" + re.escape(key) + r"\s*=\s*")
    for i, line in enumerate(text.splitlines(), 1):
        m = pat.match(line)
        if m:
            found = (i, m.end() + 1, line)
    return found


def located(error: StudentError, text: str, source: str):
    """A StudentError about a recipe's ``student.blocks`` as a located RecipeError."""
    line, col, src = setting_position(text)
    return RecipeError([Diagnostic(source, line, col, str(error), source_line=src)])
