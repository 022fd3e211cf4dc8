"""Parsing and meaning: the card's lines, every syntax form, presets, settings, includes."""

from __future__ import annotations

import pytest

from qdsl.errors import RecipeError
from qdsl.lang import PRESETS, load_recipe, parse_recipe
from qdsl.config.recipe import Loc, Rule, Selector, Settings
from qdsl.config.spec import (MSE, GroupWise, MinMax, Percentile, PerChannel, PerGroup, PerTensor,
                              PerToken, RunningMinMax, TensorPatch)

W, A = TensorPatch, TensorPatch


def rule(text: str) -> Rule:
    (r,) = parse_recipe(text).rules
    return r


def test_card_line_res_sum():
    r = rule("block.*.res_sum -> a16")
    assert r == Rule(Selector("glob", "block.*.res_sum"), TensorPatch(), TensorPatch(bits=16))
    assert r.weight.is_empty()


def test_card_line_c_fc_per_group():
    r = rule("mlp.c_fc -> w8 per_group(K=8, permute)")
    assert r.selector == Selector("glob", "mlp.c_fc")
    assert r.weight == TensorPatch(bits=8)
    assert r.activation == TensorPatch(granularity=PerGroup(8, True))


@pytest.mark.parametrize("text, weight, activation", [
    ("* -> w8 per_channel sym mse, a8 asym minmax",
     W(bits=8, granularity=PerChannel(), symmetric=True, observer=MSE()),
     A(bits=8, symmetric=False, observer=MinMax())),
    ("x -> w4 group(size=128)", W(bits=4, granularity=GroupWise(128)), A()),
    ("x -> a16 percentile(99.9)", W(), A(bits=16, observer=Percentile(99.9))),
    ("x -> a16 percentile(p=99.9)", W(), A(bits=16, observer=Percentile(99.9))),
    ("x -> w8 observer=mse", W(bits=8, observer=MSE()), A()),
    ("x -> w8 observer=mse(candidates=50)", W(bits=8, observer=MSE(50)), A()),
    ("x -> a.running_minmax(momentum=0.95) w.mse",
     W(observer=MSE()), A(observer=RunningMinMax(0.95))),
    ("x -> a8 running_minmax", W(), A(bits=8, observer=RunningMinMax(0.9))),
    ("x -> fp16", W(float_dtype="fp16"), A(float_dtype="fp16")),
    ("x -> w.bf16 a.fp16", W(float_dtype="bf16"), A(float_dtype="fp16")),
    ("x -> w32 a32", W(bits=32), A(bits=32)),
    ("x -> w8a16", W(bits=8), A(bits=16)),
    ("x -> w8a8 a.dynamic", W(bits=8), A(bits=8, dynamic=True)),
    ("x -> w8a8 dynamic w.sym", W(bits=8, symmetric=True), A(bits=8, dynamic=True)),
    ("x -> w3a5", W(bits=3), A(bits=5)),
    ("x -> a8 per_token", W(), A(bits=8, granularity=PerToken())),
    ("x -> a8 w4 sym", W(bits=4, symmetric=True), A(bits=8)),  # sym binds to the current kind
    ("x -> w8 per_tensor, a8 per_tensor", W(bits=8, granularity=PerTensor()),
     A(bits=8, granularity=PerTensor())),
    ("x -> per_group(8) static", W(), A(granularity=PerGroup(8), dynamic=False)),
    ("x -> w8,a8 , static", W(bits=8), A(bits=8, dynamic=False)),  # commas are optional
])
def test_spec_meaning(text, weight, activation):
    if weight is None:
        with pytest.raises(RecipeError):
            rule(text)
        return
    r = rule(text)
    assert (r.weight, r.activation) == (weight, activation)


@pytest.mark.parametrize("text, selector", [
    ("* -> w8", Selector("glob", "*")),
    ("block.[0-5].mlp.* -> w4", Selector("glob", "block.[0-5].mlp.*")),
    ("block.[0,2,4-6].attn.scores -> a16", Selector("glob", "block.[0,2,4-6].attn.scores")),
    ("op:softmax -> a16", Selector("op", "softmax")),
    ("type:Linear -> w8", Selector("type", "Linear")),
    ("module:transformer.h.*.mlp.c_fc -> w4", Selector("module", "transformer.h.*.mlp.c_fc")),
    (r're:"block\.(0|1)\..*" -> skip', Selector("re", r"block\.(0|1)\..*")),
    ("lm_head? -> skip", Selector("glob", "lm_head", optional=True)),
    ("lm_head ? -> skip", Selector("glob", "lm_head", optional=True)),
    ("op:softmax? -> a16", Selector("op", "softmax", optional=True)),
    ("settings.x -> w8", Selector("glob", "settings.x")),
])
def test_selectors(text, selector):
    assert rule(text).selector == selector


def test_skip_and_locations():
    r = parse_recipe("# c\n\n  lm_head -> skip  # float\n", file="f.qrec").rules[0]
    assert r.skip and r.weight.is_empty() and r.activation.is_empty()
    assert r.loc == Loc("f.qrec", 3, 3)


def test_settings():
    r = parse_recipe('set calib.samples = 128\nset lower = int8\nset calib.data = "d \\"q\\""\n'
                     'set calib.seed = 0\nset lower = "fake"\n')
    assert r.settings == Settings(calib_samples=128, calib_seed=0, calib_data='d "q"',
                                  lower="fake")
    assert parse_recipe("* -> w8").settings == Settings()


def test_later_settings_leave_old_hashes_alone():
    """A setting added after sweep caches were keyed appears in the JSON only when set."""
    assert "lower_compute" not in Settings().to_json()
    r = parse_recipe("set lower.compute = fp32\n* -> w4 group(size=32)")
    assert r.settings.lower_compute == "fp32" and r.settings.to_json()["lower_compute"] == "fp32"
    assert r.hash() != parse_recipe("* -> w4 group(size=32)").hash()


def test_presets_are_spec_text():
    for word, text in PRESETS.items():
        assert rule(f"x -> {word}") == rule(f"x -> {text}")
    for word in ("w8a8", "w8a16", "w8a32", "w4a16", "w4a8", "w4a32", "w8a4", "w16a16"):
        assert word in PRESETS


def test_crlf_bom_and_tabs():
    r = parse_recipe("\ufeff*\t->\tw8\r\nx -> a8\r\n")
    assert [x.selector.pattern for x in r.rules] == ["*", "x"]


def test_include_splices_in_place(tmp_path):
    (tmp_path / "base.qrec").write_text("* -> w8a8\nset calib.samples = 64\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "top.qrec").write_text(
        'x -> a16\ninclude "../base.qrec"\nlm_head -> skip\nset calib.samples = 32\n')
    r = load_recipe(tmp_path / "sub" / "top.qrec")
    assert [x.selector.pattern for x in r.rules] == ["x", "*", "lm_head"]
    assert r.rules[1].loc.file == str(tmp_path / "sub" / ".." / "base.qrec")
    assert r.settings.calib_samples == 32
    assert r.source == str(tmp_path / "sub" / "top.qrec") and r.text.startswith("x -> a16")


def test_include_falls_back_to_shipped_recipes(tmp_path):
    (tmp_path / "mine.qrec").write_text('include "storti/base.qrec"\nblock.*.res_sum -> a16\n')
    r = load_recipe(tmp_path / "mine.qrec")
    assert r.rules[0].selector.pattern == "*" and r.rules[0].weight.observer == MSE()


def test_diamond_include_is_not_a_cycle(tmp_path):
    (tmp_path / "a.qrec").write_text("* -> w8\n")
    (tmp_path / "b.qrec").write_text('include "a.qrec"\n')
    (tmp_path / "top.qrec").write_text('include "a.qrec"\ninclude "b.qrec"\n')
    assert len(load_recipe(tmp_path / "top.qrec").rules) == 2


def test_cascade_later_rule_overrides_only_what_it_sets():
    r = parse_recipe("* -> w8 sym mse, a8 asym\nblock.*.res_sum -> a16\n")
    base, res = r.rules
    assert base.activation.then(res.activation) == TensorPatch(bits=16, symmetric=False)
    assert base.weight.then(res.weight) == base.weight


def test_language_never_imports_torch():
    import subprocess
    import sys
    code = ("import sys, qdsl.lang, qdsl.cli.commands.check, qdsl.cli.commands.fmt; "
            "qdsl.lang.parse_recipe('* -> w8a8'); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
