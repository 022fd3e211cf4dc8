"""The `.input` port: parsing, rendering and JSON of selectors naming a linear's input."""

from __future__ import annotations

import pytest

from qdsl.config.recipe import Recipe, Selector
from qdsl.lang import parse_recipe
from qdsl.lang.formatter import format_text


@pytest.mark.parametrize("text, selector", [
    ("type:Linear.input -> a8", Selector("type", "Linear", False, "input")),
    ("block.*.mlp.down.input? -> a16", Selector("glob", "block.*.mlp.down", True, "input")),
    ("*.input -> a8", Selector("glob", "*", False, "input")),
    ("op:linear.input -> skip", Selector("op", "linear", False, "input")),
    ("module:model.layers.*.mlp.down_proj.input -> a8",
     Selector("module", "model.layers.*.mlp.down_proj", False, "input")),
    ('re:"block\\.0\\..*".input? -> a8', Selector("re", r"block\.0\..*", True, "input")),
    # not a port: `input` alone is a name, `inputs` another segment, inside a regex text
    ("input -> a8", Selector("glob", "input", False, None)),
    ("block.*.inputs -> a8", Selector("glob", "block.*.inputs", False, None)),
    ('re:"x.input" -> a8', Selector("re", "x.input", False, None)),
])
def test_port_parses(text, selector):
    (rule,) = parse_recipe(text).rules
    assert rule.selector == selector
    assert rule.selector.text() == text.split(" -> ")[0]


def test_port_rule_sets_only_the_activation():
    (rule,) = parse_recipe("type:Linear.input -> a8 sym per_tensor static").rules
    assert rule.weight.is_empty() and rule.activation.bits == 8
    assert not rule.sets_weight() and rule.sets_activation()
    (skip,) = parse_recipe("mlp.down.input -> skip").rules
    assert skip.skip and not skip.sets_weight()


def test_port_in_json_only_when_set_so_old_hashes_stay():
    plain = parse_recipe("type:Linear -> a8")
    port = parse_recipe("type:Linear.input -> a8")
    assert "port" not in plain.to_json()["rules"][0]["selector"]
    assert port.to_json()["rules"][0]["selector"]["port"] == "input"
    assert plain.hash() != port.hash()
    back = Recipe.from_json(port.to_json())
    assert back.rules == port.rules


def test_format_keeps_the_port():
    text = "type:Linear.input -> a8 static per_tensor\nmlp.down.input? -> a16\n"
    assert format_text(text) == ("type:Linear.input -> a8 per_tensor static\n"
                                 "mlp.down.input?   -> a16\n")
