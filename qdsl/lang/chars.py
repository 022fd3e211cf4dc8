"""Characters a recipe may not hold, and how an error names them.

A recipe is ASCII outside strings and comments; strings and comments may hold
any visible character. Refused everywhere: control characters (C0, DEL, C1),
lone surrogates, and the invisible format characters (Unicode category Cf:
zero-width spaces and joiners, the bidirectional controls used by "Trojan
Source" attacks, soft hyphens, tag characters; plus the line/paragraph
separators), because they make a line read differently from what it says.
Inside strings, the other blank-looking characters (Hangul fillers, braille
blank, variation selectors, the combining grapheme joiner) are refused too: a
path or a dataset name must look like what it is. A non-ASCII character in
code gets its code point, its Unicode name and, when it has one, the ASCII
character it imitates (``'ԁ' (U+0501 CYRILLIC SMALL LETTER KOMI DE) looks
like 'd'``).
"""

from __future__ import annotations

import unicodedata

# Bidirectional controls: embeddings, overrides, isolates, marks.
BIDI = frozenset(map(chr, [0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F),
                           *range(0x2066, 0x206A)]))
# Visible as nothing but not category Cf (refused inside strings).
BLANK_LOOKING = frozenset(map(chr, [0x034F, 0x115F, 0x1160, 0x2800, 0x3164, 0xFFA0,
                                    *range(0xFE00, 0xFE10)]))

# Lookalikes NFKC does not map to ASCII (it maps fullwidth, mathematical letters,
# ligatures and the Unicode spaces). Cyrillic, Greek, Latin extensions, punctuation.
_PAIRS = (
    "аa вB еe іi јj кk оo рp сc ѕs уy хx ԁd ԛq ԝw һh ӏl ɡg ɑa ıi ȷj ℓl ǀl "
    "АA ВB ЕE КK МM НH ОO РP СC ТT ХX ІI ЈJ ЅS ԚQ ԜW ҮY "
    "οo νv ιi κk ρp υu αa ϲc ϳj "
    "ΑA ΒB ΕE ΖZ ΗH ΙI ΚK ΜM ΝN ΟO ΡP ΤT ΥY ΧX "
    "‐- ‑- ‒- –- —- ―- −- ﹣- ˗- ․. ∗* ⁎* ✱* ∶: ː: ։: ‚, ٫,"
)
LOOKALIKE = {p[0]: p[1] for p in _PAIRS.split()}
LOOKALIKE.update({"\u2192": "->", "\u27f6": "->", "\u2794": "->", "\u201c": '"',
                  "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"',
                  "\u2018": "'", "\u2019": "'", "\u201b": "'", "\u2032": "'"})


def describe(ch: str) -> str:
    """``U+0501 CYRILLIC SMALL LETTER KOMI DE`` (the name when Unicode has one)."""
    name = unicodedata.name(ch, "")
    return f"U+{ord(ch):04X} {name}".rstrip()


def lookalike(ch: str) -> str | None:
    """The ASCII text ``ch`` imitates, if any."""
    if ch in LOOKALIKE:
        return LOOKALIKE[ch]
    norm = unicodedata.normalize("NFKC", ch)
    return norm if norm != ch and norm.isascii() and norm.isprintable() else None


def _shown(ch: str) -> str:
    """``'ԁ' (U+0501 ...)``, or only the parenthesis for a character that does not print."""
    glyph = f"'{ch}' " if ch.isprintable() and unicodedata.category(ch)[0] != "M" \
        and not ch.isspace() and ch not in BLANK_LOOKING else ""
    return f"{glyph}({describe(ch)})"


def refused_everywhere(ch: str) -> tuple[str, str | None] | None:
    """(message, hint) if ``ch`` may not appear anywhere in a recipe line."""
    o = ord(ch)
    cat = unicodedata.category(ch)
    if cat == "Cc" and ch != "\t":
        return f"control character U+{o:04X} is not allowed in a recipe", None
    if ch == "\ufffd":
        return "invalid UTF-8 is not allowed in a recipe", "save the file as UTF-8"
    if cat == "Cs":
        return f"lone surrogate U+{o:04X} is not allowed in a recipe", None
    if ch in BIDI:
        return (f"bidirectional control character {_shown(ch)} is not allowed in a recipe",
                "it makes the line display in a different order from what it says; delete it")
    if cat in ("Cf", "Zl", "Zp"):
        return (f"invisible character {_shown(ch)} is not allowed in a recipe",
                "it hides between the visible characters; delete it")
    return None


def refused_in_string(ch: str) -> tuple[str, str | None] | None:
    if ch in BLANK_LOOKING:
        return (f"invisible character {_shown(ch)} is not allowed in a string",
                "it hides between the visible characters; delete it")
    return None


def refused_in_code(ch: str) -> tuple[str, str | None] | None:
    """Non-ASCII outside strings and comments: name it and what it looks like."""
    if ch.isascii():
        return None
    like = lookalike(ch)
    if like is not None:
        return (f"non-ASCII character {_shown(ch)} looks like '{like}'",
                f"recipes are ASCII outside strings and comments: type `{like}`")
    return (f"non-ASCII character {_shown(ch)}",
            "recipes are ASCII outside strings and comments")


def first_refused(src: str) -> tuple[int, str, str | None] | None:
    """(column, message, hint) of the first character ``src`` may not hold, else None.

    Strings (``"..."``, with ``\\"`` escapes) and comments (``#`` outside a string)
    are told apart here as the grammar does; an unterminated string runs to the end.
    """
    in_str = in_comment = escaped = False
    for col, ch in enumerate(src, start=1):
        problem = refused_everywhere(ch)
        if problem is None and not in_comment:
            if in_str:
                problem = refused_in_string(ch)
            elif ch != '"' and ch != "#":
                problem = refused_in_code(ch)
        if problem is not None:
            return (col, *problem)
        if in_comment:
            continue
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch == "#":
            in_comment = True
    return None
