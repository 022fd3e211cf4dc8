"""The helpers that live once (issue 14): selector text, atomic paths, Conv1D, op tables."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qdsl.config.recipe import Selector, selector_text
from qdsl.lang.parser import parse_document
from qdsl.lang.syntax import RuleLine


@pytest.mark.parametrize("kind, pattern, optional, text", [
    ("glob", "block.*.mlp.c_fc", False, "block.*.mlp.c_fc"),
    ("glob", "lm_head", True, "lm_head?"),
    ("op", "softmax", False, "op:softmax"),
    ("type", "Linear", True, "type:Linear?"),
    ("module", "transformer.h.*.attn", False, "module:transformer.h.*.attn"),
    ("re", r"block\.[0-3]\.mlp\..*", True, r're:"block\.[0-3]\.mlp\..*"?'),
])
def test_selector_text_parses_back(kind, pattern, optional, text):
    assert selector_text(kind, pattern, optional) == text
    assert Selector(kind, pattern, optional).text() == text
    doc, diags = parse_document(f"{text} -> w8\n")
    assert not diags
    (line,) = [ln for ln in doc.lines if isinstance(ln, RuleLine)]
    sel = line.selector
    assert (sel.kind, sel.pattern, sel.optional) == (kind, pattern, optional)
    assert sel.text() == text
