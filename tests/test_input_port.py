"""`.input` rules on tiny models: the plan sets the producer's output, the cascade,
located errors, explain's input column, and int8 lowering absorbing the quantizer."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny import tiny, tiny_ids

import qdsl.compiler as C
from qdsl.errors import PlanError
from qdsl.lang import load_recipe, parse_recipe
from qdsl.resources import data_dir
from qdsl.runtime import Int8StaticLinear

WEI = "* -> w8 sym per_channel\ntype:Linear.input -> a8 sym per_tensor static\n"
LLAMA_LINEAR_INPUTS = {"ln_1", "attn.context", "ln_2", "mlp.mul"}


def explain(text, family, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return C.explain(parse_recipe(text, "t.qrec"), tiny(family), **kw)


def quantized_acts(plan):
    return {e.name for e in plan.entries if e.activation.quantized}


def test_every_linear_input_llama_incl_down_projection():
    plan = explain(WEI, "llama").plan
    want = {f"block.{b}.{p}" for b in (0, 1) for p in LLAMA_LINEAR_INPUTS} | {"ln_f"}
    assert quantized_acts(plan) == want
    assert plan["block.0.mlp.mul"].decided_by["activation"]["bits"] == "t.qrec:2:1"
    assert not plan["block.0.mlp.act"].activation.quantized   # act alone is not an input


def test_every_linear_input_gpt2():
    plan = explain(WEI, "gpt2").plan
    want = {f"block.{b}.{p}" for b in (0, 1)
            for p in ("ln_1", "attn.context", "ln_2", "mlp.act")} | {"ln_f"}
    assert quantized_acts(plan) == want


def test_cascade_later_rules_win_both_ways():
    plan = explain(WEI + "mlp.down.input -> a16\n", "llama").plan
    assert plan["block.1.mlp.mul"].activation.bits == 16
    assert plan["block.1.ln_2"].activation.bits == 8
    # an output rule after the input rule overrides it on the same tensor, and back
    plan = explain(WEI + "block.*.mlp.mul -> a4\n", "llama").plan
    assert plan["block.0.mlp.mul"].activation.bits == 4
    plan = explain("* -> w8\nblock.*.mlp.mul -> a4 sym\ntype:Linear.input -> a8\n",
                   "llama").plan
    a = plan["block.0.mlp.mul"].activation
    assert (a.bits, a.symmetric) == (8, True)   # bits from the input rule, sym kept
    # skip on a port sets only the activation back to float; the weights stay
    plan = explain(WEI + "attn.out.input -> skip\n", "llama").plan
    assert not plan["block.0.attn.context"].activation.quantized
    assert plan["block.0.attn.out"].weight.bits == 8


def test_shared_input_selected_in_part_is_a_located_error():
    with pytest.raises(PlanError) as e:
        explain("* -> w8\nattn.q.input -> a8\n", "llama")
    (d,) = e.value.diagnostics
    assert (d.line, d.col) == (2, 1)
    assert d.message == ("`attn.q.input`: the input of `block.0.attn.q` is one tensor (the "
                         "output of `block.0.ln_1`) with the input of `block.0.attn.k`, "
                         "`block.0.attn.v`, which this rule does not select")
    assert d.hint.startswith("a `.input` rule quantizes the tensor for every linear")


def test_port_on_nodes_without_linears_is_an_error():
    with pytest.raises(PlanError) as e:
        explain("block.*.mlp.act.input -> a8\n", "llama")
    assert e.value.diagnostics[0].message == (
        "`block.*.mlp.act.input` sets the input of linears, and none of the 2 node(s) it "
        "matches is one (e.g. `block.0.mlp.act`, act_fn)")
    plan = explain("block.*.mlp.act.input? -> a8\n", "llama").plan   # optional: nothing
    assert not quantized_acts(plan)


def test_input_without_named_producer_error_or_optional():
    with pytest.raises(PlanError) as e:
        explain("type:Linear.input -> a8\n", "bert")
    msg = e.value.diagnostics[0].message
    assert msg.startswith("`type:Linear.input`: the input of `block.0.attn.q` is not the "
                          "output of a named node (it is fx node dropout")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ex = C.explain("type:Linear.input? -> a8\n", tiny("bert"))
    acts = quantized_acts(ex.plan)
    assert "block.0.ln_2" in acts and "block.0.mlp.act" in acts
    # bert's ln_2 also feeds the residual add: a warning names that reader
    assert any("also read(s)" in w.message and "aten.add.Tensor" in w.message
               for w in ex.plan.warnings)


def test_explain_shows_each_linears_input():
    rows = {r["name"]: r for r in explain(WEI, "llama", lower="int8").rows()}
    assert rows["block.0.mlp.down"]["input"] == "a8 sym per_tensor minmax static <- mlp.mul"
    assert rows["block.0.mlp.down"]["input_from"] == "block.0.mlp.mul"
    assert rows["lm_head"]["input"].endswith("<- ln_f")
    assert "input" not in rows["block.0.ln_1"]
    assert rows["block.0.mlp.down"]["exec"] == "int8 gemm (static)"
    assert rows["block.0.mlp.mul"]["exec"] == "int8 (gemm input)"
    table = explain(WEI, "llama").table()
    assert table.splitlines()[0].split()[:5] == ["name", "role", "module", "weight", "input"]


def test_int8_lowering_absorbs_input_quantizers_into_static_gemms():
    model = tiny("llama")
    q = C.compile(model, WEI, calib=tiny_ids(model, 2, 16), lower="int8", max_cache_len=32,
                  progress=False)
    linears = {n.name for n in q.named.nodes if n.role == "linear"}
    got = {n.meta.get("qdsl"): type(q.gm.get_submodule(n.target))
           for n in q.gm.graph.nodes if n.op == "call_module" and "qdsl_int8__" in n.target}
    assert {k for k, t in got.items() if t is Int8StaticLinear} == linears
    fake = C.compile(model, WEI, calib=tiny_ids(model, 2, 16), lower="fake", max_cache_len=32,
                     progress=False)
    ids = tiny_ids(model, 2, 12, seed=7)
    a, b = q(ids), fake(ids)
    assert (a - b).abs().max() <= 0.02 * b.abs().max()


@pytest.mark.parametrize("family, per_block", [("llama", {"mlp.mul"}),
                                               ("gpt2", {"mlp.c_fc", "mlp.act"})])
def test_storti_mlp_c_fc_keeps_exactly_the_named_activation(family, per_block):
    recipe = load_recipe(data_dir("recipes") / "storti" / "t3_mlp_c_fc.qrec")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = C.explain(recipe, tiny(family)).plan
    a16 = {e.name for e in plan.entries if e.activation.bits == 16}
    assert a16 == {f"block.{b}.{p}" for b in (0, 1) for p in per_block}


@pytest.mark.parametrize("name", ["t4_static_per_tensor", "t4_static_per_column",
                                  "t4_dynamic_per_tensor"])
def test_wei_recipes_quantize_every_linear_input(name):
    recipe = load_recipe(data_dir("recipes") / "wei" / f"{name}.qrec")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ex = C.explain(recipe, tiny("llama"))
    for r in ex.rows():
        if r["role"] == "linear":
            assert r["input"].startswith("a8 "), (r["name"], r["input"])
