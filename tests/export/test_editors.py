"""Editor support: the Pygments lexer (entry point ``qrec``) on every shipped recipe,
the TextMate grammar under editors/, and ``qdsl check --format json``."""

from __future__ import annotations

import importlib
import json
import re
import tomllib
from pathlib import Path

import pytest
from pygments.token import Error, Keyword, Name, Operator

from qdsl.cli import main
from qdsl.lang.highlight import QrecLexer
from qdsl.lang.options import OPTIONS
from qdsl.lang.presets import PRESETS

ROOT = Path(__file__).parents[2]
RECIPES = sorted((ROOT / "recipes").rglob("*.qrec"))
GRAMMAR = json.loads((ROOT / "editors" / "qrec.tmLanguage.json").read_text())


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_lexer_on_every_shipped_recipe(path):
    text = path.read_text()
    tokens = list(QrecLexer().get_tokens(text))
    assert not [t for t in tokens if t[0] in Error], path
    assert "".join(v for _, v in tokens) == text + ("" if text.endswith("\n") else "\n")
    rules = [ln for ln in text.splitlines() if "->" in ln.split("#")[0]]
    assert sum(v == "->" and t in Operator for t, v in tokens) == len(rules)
    for ln in text.splitlines():     # every selector is a name, every spec word known
        if ln.startswith(("set ", "include ")):
            assert any(t in Keyword and v == ln.split()[0] for t, v in tokens)
    for t, v in tokens:                 # spec words: options are keywords, presets types
        # (a setting's value is a constant even where it spells an option: lower.kv_cache = fp16)
        if v in OPTIONS and v not in PRESETS and t not in Name.Tag and t not in Name.Constant:
            assert t in Keyword, (path, v, t)
        if v in PRESETS and t not in Name.Tag:
            assert t in Keyword.Type, (path, v, t)


def test_lexer_is_the_pygments_entry_point():
    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    module, attr = eps["pygments.lexers"]["qrec"].split(":")
    cls = getattr(importlib.import_module(module), attr)
    assert cls is QrecLexer and "qrec" in cls.aliases and "*.qrec" in cls.filenames


def _patterns(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("match", "begin", "end"):
                yield v
            else:
                yield from _patterns(v)
    elif isinstance(node, list):
        for v in node:
            yield from _patterns(v)


def test_textmate_grammar_is_valid_and_knows_every_option():
    assert GRAMMAR["scopeName"] == "source.qrec" and GRAMMAR["fileTypes"] == ["qrec"]
    for p in _patterns(GRAMMAR):
        re.compile(p)                  # the subset shared by Oniguruma and Python
    option = next(p["match"] for p in GRAMMAR["repository"]["rule"]["patterns"]
                  if p.get("name") == "keyword.other.option.qrec")
    assert set(option[len(r"\b(?:"):-len(r")\b")].split("|")) == set(OPTIONS) - set(PRESETS)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_textmate_grammar_matches_every_line_of_shipped_recipes(path):
    repo = GRAMMAR["repository"]
    heads = [re.compile(repo[k].get("match") or repo[k]["begin"])
             for k in ("comment", "setting", "include", "transform", "rule")]
    for ln in path.read_text().splitlines():
        if ln.strip():
            assert any(h.match(ln.lstrip()) for h in heads), ln


def test_check_json_for_editors(tmp_path, capsys):
    p = tmp_path / "r.qrec"
    p.write_text("set export = gguf\n* -> w8\n")
    assert main(["check", "--format", "json", str(p)]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out == [{"file": str(p), "line": 2, "column": 1, "severity": "error",
                    "message": "`set export = gguf`: w8 without a granularity is per_channel, "
                               "which GGUF's 32-column blocks cannot carry",
                    "hint": "write w8 sym group(size=32)"}]
    assert main(["check", "--format", "json", str(ROOT / "recipes" / "card.qrec")]) == 0
    assert json.loads(capsys.readouterr().out) == []
