"""Fuzz the recipe loader and the check / fmt commands with random bytes and random
mutations of the shipped recipes: every outcome is a recipe or a clean project
error located at FILE:LINE:COL, the CLI never prints a traceback, and a mutated
recipe that parses formats to text that parses to the same recipe."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from qdsl.cli import main
from qdsl.errors import QdslError, RecipeError
from qdsl.lang import check_file, format_text, load_recipe, parse_recipe

RECIPES = sorted((Path(__file__).parents[2] / "recipes").rglob("*.qrec"))
assert RECIPES, "the shipped recipes are missing"
TEXTS = [p.read_bytes() for p in RECIPES]

# what a mutation inserts: recipe punctuation, any character, a few nasty ones
PIECE = st.one_of(
    st.sampled_from(["->", "*", ".", "?", "#", '"', "\\", "(", ")", "=", ",", " ", "\n",
                     "\r\n", "\t", "w8", "a16", "per_group(K=8)", "include ", "set ",
                     'include "base.qrec"', "re:\"", "\u200b", "\u202e", "\u0501", "\ufeff"]),
    st.characters(blacklist_categories=("Cs",)),  # a lone surrogate has no UTF-8: RAW covers bytes
).map(lambda s: s.encode("utf-8"))
RAW = st.binary(min_size=1, max_size=4)
MUTATION = st.tuples(st.sampled_from(["insert", "delete", "replace"]),
                     st.floats(0, 1), st.one_of(PIECE, RAW))


def _mutate(data: bytes, mutations) -> bytes:
    for op, where, piece in mutations:
        i = int(where * len(data))
        if op == "insert":
            data = data[:i] + piece + data[i:]
        elif op == "delete":
            data = data[:i] + data[i + len(piece):]
        else:
            data = data[:i] + piece + data[i + len(piece):]
    return data


def _cli(argv: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    text = out.getvalue() + err.getvalue()
    assert "Traceback" not in text and "internal error" not in text, text
    return code, text


def _exercise(path: Path) -> None:
    # the loader `qdsl check` and `qdsl compile` use: a recipe or a located RecipeError
    try:
        recipe = load_recipe(path)
    except RecipeError as e:
        recipe = None
        assert all(d.file and d.line >= 1 and d.col >= 1 for d in e.diagnostics)
        shown = e.format()
        assert all(c.isprintable() or c in "\n\t" for c in shown)
    except QdslError as e:  # any other project error: still a clean one-liner
        recipe = None
        e.format()
    for d in check_file(path):
        d.format()
    code, _ = _cli(["check", str(path)])
    assert code == (0 if recipe is not None else 1)
    code, _ = _cli(["fmt", str(path)])
    assert code in (0, 1)
    if recipe is not None:  # format-then-parse is the identity
        text = path.read_bytes().decode("utf-8")
        once = format_text(text, str(path))
        back = parse_recipe(once, str(path))
        assert (back.rules, back.settings) == (recipe.rules, recipe.settings), once
        assert format_text(once, str(path)) == once


@given(st.sampled_from(range(len(TEXTS))), st.lists(MUTATION, min_size=1, max_size=6))
def test_mutated_shipped_recipes(tmp_path_factory, which, mutations):
    folder = tmp_path_factory.mktemp("m")
    # next to the original's name, so `include "base.qrec"` falls back to the shipped one
    path = folder / RECIPES[which].name
    path.write_bytes(_mutate(TEXTS[which], mutations))
    _exercise(path)


@given(st.binary(max_size=300))
def test_random_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("b") / "x.qrec"
    path.write_bytes(data)
    _exercise(path)
