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


# --- transform statements --------------------------------------------------

from hypothesis import given, strategies as st  # noqa: E402
from strategies import selectors  # noqa: E402

from qdsl.config.recipe import Transform  # noqa: E402

transforms = st.one_of(
    st.builds(lambda sel, a: Transform("smooth", sel, (("alpha", a),)), selectors,
              st.floats(0.0, 1.0).map(lambda x: round(x, 3))),
    st.just(Transform("rotate")))


@given(st.lists(transforms, min_size=1, max_size=4))
def test_transforms_format_then_parse_identity(ts):
    text = "".join(t.text() + "\n" for t in ts)
    back = parse_recipe(text)
    assert back.transforms == tuple(ts) and not back.rules
    assert format_text(text) == text
    assert Recipe.from_json(back.to_json()).transforms == back.transforms


def test_transforms_defaults_order_and_hash():
    r = parse_recipe("* -> w8\nsmooth type:Linear?  # c\nrotate\n")
    assert r.transforms == (Transform("smooth", Selector("type", "Linear", True), (("alpha", 0.5),)),
                            Transform("rotate"))
    assert format_text("smooth type:Linear?  # c\n") == "smooth type:Linear? alpha=0.5  # c\n"
    assert parse_recipe("* -> w8").hash() != parse_recipe("* -> w8\nrotate").hash()
    assert "transforms" not in parse_recipe("* -> w8").to_json()


@pytest.mark.parametrize("text, col, message, hint", [
    ("smooth x alpha=1.5", 10, "`alpha` must be a number in [0, 1], got `1.5`", None),
    ("smooth x alpha=big", 10, "`alpha` must be a number in [0, 1], got `big`", None),
    ("smooth x beta=1", 10, "unknown parameter `beta` for `smooth`", "`smooth` takes alpha"),
    ("smooth x alpha=0.1 alpha=0.2", 20, "parameter `alpha` given twice", None),
    ("rotate alpha=1", 8, "unknown parameter `alpha` for `rotate`",
     "`rotate` takes no parameters"),
    ("smooth mlp.down.input", 16, "`smooth` selects the linears whose inputs it transforms: "
     "drop `.input`", "write `smooth mlp.down`"),
    ("smooth -> w8", 8, "unexpected `->`; expected a selector", None),
])
def test_transform_errors(text, col, message, hint):
    from qdsl.errors import RecipeError
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, "t.qrec")
    (d,) = e.value.diagnostics
    assert (d.line, d.col, d.message, d.hint) == (1, col, message, hint)
