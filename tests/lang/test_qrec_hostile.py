"""Hostile input: only RecipeError, a located message, and fast."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qdsl.errors import RecipeError
from qdsl.lang import check_file, format_text, parse_recipe

ALPHABET = st.sampled_from(list("*.[]0123456789-,?:\"\\#()=wa_ \tbloksetinclude\n") + ["->"])


def _only_recipe_errors(text: str) -> None:
    for f in (parse_recipe, format_text):
        try:
            f(text)
        except RecipeError as e:
            assert e.diagnostics and all(d.line >= 1 and d.col >= 1 for d in e.diagnostics)
            e.format()


@given(st.text())
def test_arbitrary_text(text):
    _only_recipe_errors(text)


@given(st.lists(ALPHABET, max_size=40).map("".join))
def test_near_miss_text(text):
    _only_recipe_errors(text)


@given(st.binary(max_size=200))
def test_arbitrary_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("b") / "x.qrec"
    path.write_bytes(data)
    for d in check_file(path):
        d.format()


def test_invalid_utf8_is_one_line_without_content(tmp_path):
    # one line naming the first bad byte, never a diagnostic per line echoing the content
    path = tmp_path / "bad.qrec"
    path.write_bytes(b"* -> w8\nsecret -> a\xff8\n\xfe\n")
    (d,) = check_file(path)
    assert (d.line, d.col, d.message) == (
        2, 12, "not a recipe file (binary): invalid UTF-8 byte 0xff (byte offset 19)")
    assert "secret" not in d.format()


def test_nul_byte_is_binary(tmp_path):
    path = tmp_path / "nul.qrec"
    path.write_bytes(b"* -> w8\nTOKEN=abc\0PATH=/bin\n" * 50)
    (d,) = check_file(path)
    assert d.message == "not a recipe file (binary): it holds a NUL byte"
    assert "TOKEN" not in d.format()


def test_control_bytes():
    with pytest.raises(RecipeError) as e:
        parse_recipe("* -> w8\x00\n* -> \x1b[31ma8\n")
    got = [(d.line, d.col, d.message) for d in e.value.diagnostics]
    assert got == [(1, 8, "control character U+0000 is not allowed in a recipe"),
                   (2, 6, "control character U+001B is not allowed in a recipe")]
    assert "\x1b" not in e.value.format()


@pytest.mark.parametrize("text", [
    "* -> " + "w8 " * 70_000,
    "block." * 40_000 + "x -> w8",
    "x" * 200_000,
    "[" * 200_000,
    're:"' + "(" * 9000 + '" -> w8',
    "* -> per_group" + "(" * 500 + ")" * 500,
    "(" * 500 + ")" * 500,
    "* -> w" + "9" * 5000,
    "set calib.samples = " + "9" * 5000,
])
def test_huge_and_nested_inputs_fail_fast(text):
    t0 = time.perf_counter()
    with pytest.raises(RecipeError) as e:
        parse_recipe(text)
    assert time.perf_counter() - t0 < 1.0
    assert len(e.value.format()) < 2000


def test_many_bad_lines_are_all_reported_quickly():
    text = "* -> w0\n" * 5000
    t0 = time.perf_counter()
    with pytest.raises(RecipeError) as e:
        parse_recipe(text)
    assert len(e.value.diagnostics) == 5000
    assert time.perf_counter() - t0 < 3.0


@pytest.mark.parametrize("line, col, message", [
    # homoglyphs: the code point, its name and the ASCII character it imitates
    ("mlp.c_fc -> w8 per_\u0501roup(K=8)", 20,
     "non-ASCII character '\u0501' (U+0501 CYRILLIC SMALL LETTER KOMI DE) looks like 'd'"),
    ("bl\u043eck.*.res_sum -> a16", 3,
     "non-ASCII character '\u043e' (U+043E CYRILLIC SMALL LETTER O) looks like 'o'"),
    ("* \u2192 w8", 3, "non-ASCII character '\u2192' (U+2192 RIGHTWARDS ARROW) looks like '->'"),
    ("* -> \uff578", 6,
     "non-ASCII character '\uff57' (U+FF57 FULLWIDTH LATIN SMALL LETTER W) looks like 'w'"),
    ('include \u201cbase.qrec\u201d', 9,
     "non-ASCII character '\u201c' (U+201C LEFT DOUBLE QUOTATION MARK) looks like '\"'"),
    ("*\u00a0-> w8", 2, "non-ASCII character (U+00A0 NO-BREAK SPACE) looks like ' '"),
    ("* -> w8 \u00e9", 9, "non-ASCII character '\u00e9' (U+00E9 LATIN SMALL LETTER E WITH ACUTE)"),
    # invisible and bidi characters: refused in strings and comments too
    ('set calib.data = "std\u200blib"', 22,
     "invisible character (U+200B ZERO WIDTH SPACE) is not allowed in a recipe"),
    ('set calib.data = "std\u3164lib"', 22,
     "invisible character (U+3164 HANGUL FILLER) is not allowed in a string"),
    ("* -> w8  # ok \u202e8a -> *", 15, "bidirectional control character "
     "(U+202E RIGHT-TO-LEFT OVERRIDE) is not allowed in a recipe"),
    ('include "a\u2066.qrec"', 11, "bidirectional control character "
     "(U+2066 LEFT-TO-RIGHT ISOLATE) is not allowed in a recipe"),
    ("* -> w8\u00ad", 8, "invisible character (U+00AD SOFT HYPHEN) is not allowed in a recipe"),
    ("* -> w8 \x9b31m", 9, "control character U+009B is not allowed in a recipe"),
])
def test_suspicious_characters_are_named(line, col, message):
    with pytest.raises(RecipeError) as e:
        parse_recipe(line + "\n")
    (d,) = e.value.diagnostics
    assert (d.col, d.message) == (col, message)
    shown = e.value.format()
    assert all(c.isprintable() or c in "\n\t" for c in shown)


def test_non_ascii_in_strings_and_comments_is_fine():
    r = parse_recipe('set calib.data = "donn\u00e9es/\u0434\u0430\u043d\u043d\u044b\u0435"'
                     '  # caf\u00e9 \u2192 ok\n* -> w8  # \u00e9t\u00e9\n')
    assert r.settings.calib_data == "donn\u00e9es/\u0434\u0430\u043d\u043d\u044b\u0435"
