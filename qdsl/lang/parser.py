"""Text -> concrete syntax tree (``Document``), one line at a time.

Each line is parsed on its own with the LALR grammar in ``grammar/qrec.lark``,
so every syntax error in a file is reported, not only the first. Hostile input
(control, invisible and bidi characters, homoglyphs, very long lines, deep
parentheses) gives a located error, never another exception: the grammar has
no recursion, long lines are refused before lexing, and ``chars.first_refused``
screens every character first. (Bytes that are not UTF-8 never get here: the
loader refuses such a file as binary.)
"""

from __future__ import annotations

import difflib
import functools
import re

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from ..errors import Diagnostic
from ..resources import data_dir
from .chars import first_refused
from .syntax import (Arg, BlankLine, CommentLine, Document, IncludeLine, Line, Option,
                     RuleLine, SelectorNode, SettingLine, TransformLine)

MAX_LINE = 10_000  # characters; longer lines are refused with one error
SELECTOR_KINDS = ("op", "type", "module", "re")

# How the parser's terminal names read in a message.
_TERMINALS = {
    "_ARROW": "`->`", "_COMMA": "`,`", "_EQ": "`=`", "_LPAR": "`(`", "_RPAR": "`)`",
    "GLOB": "a selector", "OP_SEL": "a selector", "TYPE_SEL": "a selector",
    "MODULE_SEL": "a selector", "RE_SEL": "a selector", "OPTIONAL": "`?`",
    "PORT": "`.input`",
    "TARGET": "`w.` or `a.`", "WORD": "a word", "KEY": "a setting name",
    "NUMBER": "a number", "STRING": 'a "string"', "COMMENT": "a comment",
    "INCLUDE": "`include`", "SET": "`set`", "SMOOTH": "`smooth`", "ROTATE": "`rotate`",
    "$END": "the end of the line",
}
SPEC_EXAMPLE = "a spec is options such as `w8 per_channel`, `a16`, `w8a8` or `skip`"


@functools.cache
def _lark() -> Lark:
    grammar = (data_dir("grammar") / "qrec.lark").read_text(encoding="utf-8")
    return Lark(grammar, parser="lalr", start=["line", "spec"], maybe_placeholders=False)


def split_lines(text: str) -> list[str]:
    """Lines without their terminators (``\\n`` or ``\\r\\n``); a leading BOM is dropped."""
    text = text.removeprefix("\ufeff")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def parse_document(text: str, file: str = "<string>") -> tuple[Document, list[Diagnostic]]:
    """Parse every line; return the lines that parsed and one diagnostic per bad line."""
    source = split_lines(text)
    lines: list[Line] = []
    diags: list[Diagnostic] = []
    for n, src in enumerate(source, start=1):
        node = parse_line(src, n, file, diags)
        if node is not None:
            lines.append(node)
    return Document(file, tuple(lines), tuple(source)), diags


def clip(message: str, width: int = 60) -> str:
    """Shorten every `quoted` piece of user text longer than ``width`` (hostile input)."""
    return re.sub(r"`([^`]{%d,})`" % (width + 1),
                  lambda m: f"`{m.group(1)[:width - 20]}...{m.group(1)[-10:]}`", message)


def parse_line(src: str, n: int, file: str, diags: list[Diagnostic]) -> Line | None:
    def err(col: int, msg: str, hint: str | None = None) -> None:
        diags.append(Diagnostic(file, n, col, clip(msg), hint=hint and clip(hint),
                                source_line=src))

    if not src.strip():
        return BlankLine(n)
    if len(src) > MAX_LINE:
        err(MAX_LINE + 1, f"line too long ({len(src)} characters; at most {MAX_LINE})")
        return None
    refused = first_refused(src)  # control, invisible, bidi; non-ASCII code (homoglyphs)
    if refused is not None:
        err(*refused)
        return None
    quote = _unterminated_quote(src)
    if quote:
        err(quote, "unterminated string", hint='close it with `"` on the same line')
        return None
    try:
        tree = _lark().parse(src, start="line")
    except UnexpectedInput as e:
        col, msg, hint = explain_syntax_error(src, e)
        err(col, msg, hint)
        return None
    return _line_node(tree, n, len(src) - len(src.lstrip()) + 1)


def parse_spec_text(text: str) -> tuple[Option, ...]:
    """Options of a spec written on its own (presets). Raises lark errors on bad text."""
    return tuple(_option(o) for o in _lark().parse(text, start="spec").children)


def _unterminated_quote(src: str) -> int | None:
    """Column of a `"` that is never closed on this line (outside comments), else None."""
    i, start = 0, None
    while i < len(src):
        ch = src[i]
        if start is None and ch == "#":
            return None
        if ch == '"':
            start = i + 1 if start is None else None
        elif ch == "\\" and start is not None:
            i += 1
        i += 1
    return start


# --------------------------------------------------------------------------
# Syntax error messages.


def explain_syntax_error(src: str, e: UnexpectedInput) -> tuple[int, str, str | None]:
    """(column, message, hint) for a lark error on one line."""
    code_end = len(_strip_comment(src).rstrip()) + 1
    if isinstance(e, UnexpectedCharacters):
        col, ch = e.column, src[e.column - 1] if e.column - 1 < len(src) else ""
        before = re.search(r"([A-Za-z_]\w*)$", src[:col - 1])
        if ch == ":" and before:
            kind = before.group(1)
            return (before.start() + 1, f"unknown selector kind `{kind}:`",
                    did_you_mean(kind, SELECTOR_KINDS, tail="; selector kinds are op, type, "
                                  "module and re (a plain glob needs no kind)"))
        if ch == "[":
            return col, "unclosed or malformed `[` in selector", \
                "index sets look like `[0-5]` or `[0,2,4-6]`"
        if ch == "-" and before and "->" in src[:col - 1]:
            return col, "unexpected `-`", "option names use `_`: e.g. `per_channel`"
        return col, f"unexpected character `{ch}`", None
    assert isinstance(e, UnexpectedToken), f"unexpected lark error {type(e).__name__}"
    tok, expected = e.token, set(e.expected)
    at_end = tok.type == "$END"
    col = code_end if at_end or tok.column is None else tok.column
    if "_ARROW" in expected and not ({"WORD", "TARGET"} & expected):
        if at_end:
            return col, "expected `->` and a spec after the selector", \
                "a rule reads `SELECTOR -> SPEC`, e.g. `block.*.res_sum -> a16`"
        return col, f"expected `->` after the selector, found `{tok}`", None
    if at_end and expected >= {"WORD"} and "_RPAR" not in expected:
        return col, "missing spec after `->`", SPEC_EXAMPLE
    if tok.type == "COMMENT" and "WORD" in expected and "_RPAR" not in expected:
        return col, "missing spec after `->`", SPEC_EXAMPLE
    if at_end and "_RPAR" in expected:
        return col, "missing `)`", None
    if expected <= {"STRING"}:
        return col, f"expected a quoted path after `include`, found {_show(tok)}", \
            'write include "file.qrec"'
    if expected <= {"KEY"}:
        return col, f"expected a setting name after `set`, found {_show(tok)}", \
            "e.g. set calib.samples = 128"
    names = sorted({_TERMINALS.get(t, t) for t in expected})
    return col, f"unexpected {_show(tok)}; expected {' or '.join(names)}", None


def _show(tok: Token) -> str:
    return "end of line" if tok.type == "$END" else f"`{tok}`"


def _strip_comment(src: str) -> str:
    in_str, i = False, 0
    while i < len(src):
        if src[i] == "\\" and in_str:
            i += 2
            continue
        if src[i] == '"':
            in_str = not in_str
        elif src[i] == "#" and not in_str:
            return src[:i]
        i += 1
    return src


def did_you_mean(word: str, choices, tail: str = "") -> str | None:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if not close:
        lower = {c.lower(): c for c in choices}
        close = [lower[word.lower()]] if word.lower() in lower else []
    if close:
        return f"did you mean `{close[0]}`?"
    return tail.removeprefix("; ") or None


# --------------------------------------------------------------------------
# Tree -> CST.


def _line_node(tree: Tree, n: int, col: int) -> Line:
    comment = None
    stmt = None
    for child in tree.children:
        if isinstance(child, Token) and child.type == "COMMENT":
            comment = child.value.rstrip()
        else:
            stmt = child
    if stmt is None:
        return CommentLine(n, comment or "#")
    if stmt.data == "include":
        (tok,) = stmt.children
        return IncludeLine(n, col, unquote(tok.value), tok.column + 1, comment)
    if stmt.data == "setting":
        key, value = stmt.children
        vtok = value.children[0]
        v = unquote(vtok.value) if value.data == "string" else (
            to_number(vtok.value) if value.data == "number" else vtok.value)
        return SettingLine(n, col, key.value, v, str(value.data), vtok.column, comment,
                           key.column)
    if stmt.data in ("smooth", "rotate"):
        sel = [c for c in stmt.children if isinstance(c, Tree) and c.data.endswith("_selector")]
        params = tuple(_arg(c) for c in stmt.children if isinstance(c, Tree)
                       and c.data == "kwarg")
        return TransformLine(n, col, str(stmt.data), _selector(sel[0]) if sel else None,
                             params, comment)
    selector, spec = stmt.children
    return RuleLine(n, _selector(selector), tuple(_option(o) for o in spec.children), comment)


PORT_SEGMENT = ".input"  # a last segment naming the input port (docs/language.md)


def _selector(tree: Tree) -> SelectorNode:
    tok = tree.children[0]
    rest = tree.children[1:]
    optional = any(t.type == "OPTIONAL" for t in rest)
    kind = str(tree.data).removesuffix("_selector")
    text = tok.value
    if kind == "re":  # re:"..." : the pattern is raw (backslashes kept for the regex)
        port = next((t for t in rest if t.type == "PORT"), None)
        return SelectorNode("re", text[4:-1], optional, tok.column, tok.column + 4,
                            port.value[1:] if port else None, port.column if port else 0)
    prefix = 0 if kind == "glob" else len(kind) + 1
    pattern, port, port_col = text[prefix:], None, 0
    if pattern.endswith(PORT_SEGMENT) and len(pattern) > len(PORT_SEGMENT):
        pattern, port = pattern[:-len(PORT_SEGMENT)], PORT_SEGMENT[1:]
        port_col = tok.column + prefix + len(pattern)
    return SelectorNode(kind, pattern, optional, tok.column, tok.column + prefix, port, port_col)


def _option(tree: Tree) -> Option:
    target = None
    words: list[Token] = []
    args = None
    for child in tree.children:
        if isinstance(child, Token) and child.type == "TARGET":
            target = child.value[0]
        elif isinstance(child, Token):
            words.append(child)
        else:
            args = tuple(_arg(a) for a in child.children)
    first = tree.children[0]
    key = words[0].value if len(words) == 2 else None
    word = words[-1]
    return Option(target, word.value, first.column, key, args, word.column)


def _arg(tree: Tree) -> Arg:
    toks = tree.children
    if tree.data == "flag":
        return Arg(None, None, toks[0].value, toks[0].column)
    if tree.data == "positional":
        return Arg(None, to_number(toks[0].value), toks[0].value, toks[0].column)
    name, value = toks
    v = to_number(value.value) if value.type == "NUMBER" else value.value
    return Arg(name.value, v, f"{name.value}={value.value}", name.column)


def to_number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def unquote(text: str) -> str:
    """A "string" token's value: `\\"` -> `"`, `\\\\` -> `\\`; other escapes kept as written."""
    return re.sub(r'\\(["\\])', r"\1", text[1:-1])


def quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
