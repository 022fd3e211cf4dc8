"""A Pygments lexer for ``.qrec`` recipes, registered as the entry point
``pygments.lexers: qrec`` (``pygmentize -l qrec recipe.qrec``, Sphinx / MkDocs code
blocks tagged ``qrec``). Its word lists come from the language's own tables
(``lang.options``, ``lang.presets``), so it never lags a new option.

Pygments is optional: the class is built on first access (``QrecLexer``), and this
module imports nothing else until then.
"""

from __future__ import annotations

from typing import Any

from .options import OPTIONS
from .presets import PRESETS

SELECTOR_PREFIXES = ("op:", "type:", "module:")
KEYWORDS = ("set", "include")


def _words(words) -> str:
    return "(" + "|".join(sorted((w for w in words), key=len, reverse=True)) + r")\b"


def _build() -> type:
    from pygments.lexer import RegexLexer, bygroups
    from pygments.token import (Comment, Keyword, Name, Number, Operator, Punctuation,
                                String, Text, Whitespace)

    class QrecLexer(RegexLexer):
        """qdsl quantization recipes (.qrec): `SELECTOR -> SPEC` rules, `set`, `include`,
        the transforms `smooth SELECTOR alpha=A` and `rotate`."""

        name = "qrec"
        aliases = ["qrec", "qdsl"]
        filenames = ["*.qrec"]
        mimetypes = ["text/x-qrec"]
        tokens = {
            "root": [
                (r"[ \t]+", Whitespace),
                (r"\n", Whitespace),
                (r"#.*$", Comment.Single),
                (r"(set)([ \t]+)([A-Za-z_][\w.]*)([ \t]*)(=)",
                 bygroups(Keyword, Whitespace, Name.Variable, Whitespace, Operator), "value"),
                (r"(include)\b", Keyword.Namespace, "value"),
                (r"(smooth|rotate)\b", Keyword, "transform"),  # a statement word, never a selector
                (r're:"(?:[^"\\\n]|\\.)*"\??', String.Regex),
                (r"(op:|type:|module:)([\w.*\[\],-]*)(\??)",
                 bygroups(Name.Builtin, Name.Tag, Operator)),
                (r"->", Operator, "spec"),
                (r"[\w.*\[\],-]+\??", Name.Tag),            # a glob selector
            ],
            "value": [
                (r"[ \t]+", Whitespace),
                (r'"(?:[^"\\\n]|\\.)*"', String.Double),
                (r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", Number),
                (r"[A-Za-z_]\w*", Name.Constant),
                (r"#.*$", Comment.Single),
                (r"\n", Whitespace, "#pop"),
            ],
            "transform": [                                  # smooth SELECTOR alpha=A / rotate
                (r"[ \t]+", Whitespace),
                (r"#.*$", Comment.Single),
                (r"\n", Whitespace, "#pop"),
                (r"([A-Za-z_]\w*)(=)", bygroups(Name.Attribute, Operator)),
                (r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?(?=\s|#|$)", Number),
                (r're:"(?:[^"\\\n]|\\.)*"\??', String.Regex),
                (r"(op:|type:|module:)([\w.*\[\],-]*)(\??)",
                 bygroups(Name.Builtin, Name.Tag, Operator)),
                (r"[\w.*\[\],-]+\??", Name.Tag),
            ],
            "spec": [
                (r"[ \t]+", Whitespace),
                (r"#.*$", Comment.Single),
                (r"\n", Whitespace, "#pop"),
                (r"\bskip\b", Keyword.Constant),
                (r"[wa]\.", Name.Attribute),                # w. / a. target
                (_words(PRESETS), Keyword.Type),
                (r"[wa]\d+(?:a\d+)?\b", Keyword.Type),       # w8, a16, w4a8
                (_words(w for w in OPTIONS if w not in PRESETS), Keyword),
                (r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", Number),
                (r"[A-Za-z_]\w*", Name),
                (r"[(),=]", Punctuation),
                (r".", Text),
            ],
        }

    return QrecLexer


_CLASS: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    if name == "QrecLexer":
        if name not in _CLASS:
            _CLASS[name] = _build()
        return _CLASS[name]
    raise AttributeError(name)
