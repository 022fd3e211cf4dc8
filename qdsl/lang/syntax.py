"""Concrete syntax tree of a .qrec file: one node per line, comments and
positions kept (the formatter prints from it; the checker reads it).

Columns are 1-based character columns within the line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from ..config.recipe import selector_text

Number = Union[int, float]


@dataclass(frozen=True)
class Arg:
    """One argument inside ``(...)``: ``K=8`` (name+value), ``99.9`` (value), ``permute`` (flag)."""

    name: str | None
    value: Number | str | None  # str: a bare word given as a value (`permute=yes`)
    text: str  # as written, for messages
    col: int


@dataclass(frozen=True)
class Option:
    """One word of a spec: ``[w.|a.]word[=word][(args)]``.

    ``observer=mse`` is kept as key='observer', word='mse'. ``args`` is None
    when no parentheses were written (``mse``), a tuple otherwise (``mse()``).
    """

    target: str | None  # 'w' | 'a' | None
    word: str
    col: int
    key: str | None = None
    args: tuple[Arg, ...] | None = None
    word_col: int = 0  # column of `word` (after `w.` / `observer=`)

    def text(self) -> str:
        """The option as written (normalised spacing), for messages."""
        out = (f"{self.target}." if self.target else "") + (f"{self.key}=" if self.key else "")
        out += self.word
        if self.args is not None:
            out += "(" + ", ".join(a.text for a in self.args) + ")"
        return out


@dataclass(frozen=True)
class SelectorNode:
    kind: str  # glob | op | type | module | re
    pattern: str
    optional: bool
    col: int  # where the selector starts
    pattern_col: int  # where the pattern starts (after `op:`, inside `re:"`)
    port: str | None = None  # `input` when the selector ends in `.input`
    port_col: int = 0  # where `.PORT` starts

    def text(self) -> str:
        return selector_text(self.kind, self.pattern, self.optional, self.port)


@dataclass(frozen=True)
class RuleLine:
    line: int
    selector: SelectorNode
    options: tuple[Option, ...]
    comment: str | None = None


@dataclass(frozen=True)
class SettingLine:
    line: int
    col: int
    key: str
    value: Number | str
    value_kind: str  # 'number' | 'string' | 'word'
    value_col: int
    comment: str | None = None
    key_col: int = 0


@dataclass(frozen=True)
class IncludeLine:
    line: int
    col: int
    path: str
    path_col: int
    comment: str | None = None


@dataclass(frozen=True)
class TransformLine:
    """``smooth SELECTOR name=value ...`` or ``rotate name=value ...``."""

    line: int
    col: int
    kind: str  # 'smooth' | 'rotate'
    selector: SelectorNode | None
    params: tuple[Arg, ...]
    comment: str | None = None


@dataclass(frozen=True)
class CommentLine:
    line: int
    text: str  # starts with '#'


@dataclass(frozen=True)
class BlankLine:
    line: int


Statement = Union[RuleLine, SettingLine, IncludeLine, TransformLine]
Line = Union[RuleLine, SettingLine, IncludeLine, TransformLine, CommentLine, BlankLine]


@dataclass(frozen=True)
class Document:
    """A parsed file: its lines (only those that parsed) and the source text lines."""

    file: str
    lines: tuple[Line, ...]
    source_lines: tuple[str, ...]

    def source_line(self, line: int) -> str:
        return self.source_lines[line - 1] if 0 < line <= len(self.source_lines) else ""
