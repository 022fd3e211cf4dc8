"""The weight-rounding options `gptq(...)`, `awq(...)`, `rtn`: meaning, canonical form,
JSON, located errors, and the cascade."""

from __future__ import annotations

import pytest

from qdsl.config.rounding import AWQ, GPTQ, RTN
from qdsl.config.spec import (WEIGHT, GroupWise, SpecError, TensorPatch, TensorSpec, format_option,
                              resolve)
from qdsl.errors import RecipeError
from qdsl.lang import format_text, parse_recipe


def _weight(text: str) -> TensorPatch:
    return parse_recipe(f"* -> {text}").rules[0].weight


@pytest.mark.parametrize("text,rounding", [
    ("w4 gptq", GPTQ()),
    ("w4 gptq(damp=0.1, block=64, act_order)", GPTQ(0.1, 64, True)),
    ("w4 gptq(act_order)", GPTQ(act_order=True)),
    ("w4 gptq(damp=1)", GPTQ(damp=1)),
    ("w4 awq", AWQ()),
    ("w4 awq(grid=10, clip)", AWQ(10, True)),
    ("w4 w.awq(clip)", AWQ(clip=True)),
    ("w4a8 gptq", GPTQ()),       # a weights-only option binds to weights after a preset
    ("rtn", RTN()),
])
def test_options_set_the_weight_rounding(text, rounding):
    p = _weight(text)
    assert p.rounding == rounding
    assert parse_recipe(f"* -> {text}").rules[0].activation.rounding is None


@pytest.mark.parametrize("text,canonical", [
    ("* -> w4 group(128) gptq(block=128, damp=0.01)", "* -> w4 group(size=128) gptq"),
    ("* -> gptq(act_order, damp=0.05) w4", "* -> w4 gptq(damp=0.05, act_order)"),
    ("* -> awq(clip, grid=20), w4, a8", "* -> w4 awq(clip), a8"),
    ("* -> w4a16 awq(grid=7)", "* -> w4a16 awq(grid=7)"),
    ("* -> rtn", "* -> rtn"),
])
def test_canonical_form_parses_back_to_the_same_rule(text, canonical):
    out = format_text(text + "\n").strip()
    assert out == canonical
    assert parse_recipe(out).rules[0].weight == parse_recipe(text).rules[0].weight


ERRORS = [
    ("* -> w4 gptq(foo=1)", 14, "unknown argument `foo` for `gptq`"),
    ("* -> w4 gptq(damp=0)", 14, "damp must be in (0, 1], got 0"),
    ("* -> w4 gptq(damp=1.5)", 14, "damp must be in (0, 1], got 1.5"),
    ("* -> w4 gptq(block=0)", 14, "block must be an integer >= 1, got 0"),
    ("* -> w4 gptq(block=1.5)", 14, "block must be an integer >= 1, got 1.5"),
    ("* -> w4 gptq(act_order=1)", 14, "`act_order` is a flag: write `act_order` without a value"),
    ("* -> w4 awq(grid=0)", 13, "grid must be an integer in 1..1000, got 0"),
    ("* -> w4 awq(1)", 13, "`awq` takes at most 0 positional arguments"),
    ("* -> a8 a.awq", 9, "`awq` applies to weights only"),
    ("* -> w4 gptq awq", 14, "`awq` conflicts with `gptq`: both set the weights' rounding"),
    ("* -> skip gptq", 11, "`skip` cannot be combined"),
]


@pytest.mark.parametrize("text,col,message", ERRORS)
def test_bad_rounding_options_are_located_errors(text, col, message):
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, "t.qrec")
    (d,) = e.value.diagnostics
    assert (d.line, d.col) == (1, col) and d.message.startswith(message), (d.col, d.message)


def test_the_cascade_and_resolve():
    r = parse_recipe("* -> w4 group(128) gptq\nembed -> rtn\nmlp.* -> awq\n")
    p = r.rules[0].weight.then(r.rules[1].weight)
    assert resolve(WEIGHT, p).rounding is None                      # rtn resolves to None
    p = r.rules[0].weight.then(r.rules[2].weight)
    spec = resolve(WEIGHT, p)
    assert spec.rounding == AWQ() and spec.granularity == GroupWise(128)
    assert spec.describe() == "w4 sym group(size=128) minmax awq"
    assert TensorSpec.from_json(spec.to_json()) == spec
    assert TensorPatch.from_json(p.to_json()) == p
    assert "rounding" not in resolve(WEIGHT, TensorPatch(bits=4)).to_json()  # old JSON unchanged
    assert "rounding" not in TensorPatch(bits=4).to_json()


def test_the_spec_constructor_validates():
    for bad in (dict(damp=0.0), dict(damp=2), dict(block=0), dict(block=True),
                dict(act_order=1)):
        with pytest.raises(SpecError):
            GPTQ(**bad)
    for bad in (dict(grid=0), dict(grid=1001), dict(grid=2.0), dict(clip="yes")):
        with pytest.raises(SpecError):
            AWQ(**bad)
    with pytest.raises(SpecError, match="quantized weights only"):
        TensorSpec(kind="activation", bits=8, rounding=GPTQ())
    with pytest.raises(SpecError, match="quantized weights only"):
        TensorSpec(kind="weight", bits=None, rounding=AWQ())
    with pytest.raises(SpecError, match="affine grid"):
        TensorSpec(kind="weight", bits=1, symmetric=True, rounding=GPTQ())
    assert format_option(GPTQ(0.01, 128, False)) == "gptq"
    assert format_option(AWQ(20, True)) == "awq(clip)"
