"""Hostile input: only RecipeError, a located message, and fast."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qdsl.errors import RecipeError
from qdsl.lang import check_file, format_text, parse_recipe
from qdsl.lang.parser import decode

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


def test_invalid_utf8_reports_line_and_byte(tmp_path):
    path = tmp_path / "bad.qrec"
    path.write_bytes(b"* -> w8\nx -> a\xff8\n* -> w0\n")
    d1, d2 = check_file(path)
    assert (d1.line, d1.col, d1.message) == (2, 7, "invalid UTF-8 byte 0xff (byte offset 14)")
    assert (d2.line, d2.message) == (3, "weight bits must be 1..16, or 32 to keep float; got `w0`")
    text, diags = decode(b"ok\n\xc3", "f")
    assert diags[0].line == 2


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
