"""Matching a recipe against a named graph: cascade, provenance, errors, shadowing.

Uses a synthetic named graph (no torch capture) shaped like a 2-block GPT-2."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from qdsl.errors import PlanError
from qdsl.plan import QuantPlan, build_plan
from qdsl.config.recipe import Loc, Recipe, Rule, Selector
from qdsl.graph.select import glob_matches
from qdsl.config.spec import MSE, PerChannel, PerGroup, TensorPatch

WEIGHTED = {"linear", "embedding"}
BLOCK = [("ln_1", "norm", "layer_norm"), ("attn.qkv", "linear", "linear"),
         ("attn.scores", "attn_scores", "matmul"), ("attn.probs", "softmax", "softmax"),
         ("attn.context", "attn_context", "matmul"), ("attn.out", "linear", "linear"),
         ("res_attn", "residual_add", "add"), ("ln_2", "norm", "layer_norm"),
         ("mlp.c_fc", "linear", "linear"), ("mlp.act", "act_fn", "gelu"),
         ("mlp.c_proj", "linear", "linear"), ("res_sum", "residual_add", "add")]


@dataclass(frozen=True)
class Node:
    name: str
    role: str
    op: str
    module: str
    module_type: str

    @property
    def has_weight(self) -> bool:
        return self.role in WEIGHTED


@dataclass
class Named:
    nodes: tuple
    graph_hash: str = "g0"

    @property
    def module_map(self):
        return {n.name: n.module for n in self.nodes}


def gpt2_like(blocks: int = 2) -> Named:
    nodes = [Node("embed", "embedding", "embedding", "transformer.wte", "Embedding")]
    for b in range(blocks):
        for suffix, role, op in BLOCK:
            mtype = "Conv1D" if role == "linear" else "GPT2Block"
            nodes.append(Node(f"block.{b}.{suffix}", role, op, f"transformer.h.{b}.{suffix}", mtype))
    nodes += [Node("ln_f", "norm", "layer_norm", "transformer.ln_f", "LayerNorm"),
              Node("lm_head", "linear", "linear", "lm_head", "Linear")]
    return Named(tuple(nodes))


def rule(pattern, line, kind="glob", optional=False, w=None, a=None, skip=False):
    return Rule(Selector(kind, pattern, optional), weight=w or TensorPatch(),
                activation=a or TensorPatch(), skip=skip, loc=Loc("r.qrec", line, 1))


def plan_of(*rules) -> QuantPlan:
    return build_plan(Recipe(rules=tuple(rules), source="r.qrec", text=""), gpt2_like())


def test_glob_semantics():
    assert glob_matches("mlp.c_fc", "block.3.mlp.c_fc")
    assert glob_matches("block.*.res_sum", "block.11.res_sum")
    assert glob_matches("block.[0-5].mlp.*", "block.5.mlp.act")
    assert not glob_matches("block.[0-5].mlp.*", "block.6.mlp.act")
    assert glob_matches("block.[0,2,4-6].attn.scores", "block.4.attn.scores")
    assert not glob_matches("block.[0,2,4-6].attn.scores", "block.3.attn.scores")
    assert glob_matches("*", "lm_head") and not glob_matches("mlp.c_fc", "lm_head")


def test_card_lines_and_cascade():
    p = plan_of(rule("*", 1, w=TensorPatch(bits=8, observer=MSE()), a=TensorPatch(bits=8)),
                rule("block.*.res_sum", 2, a=TensorPatch(bits=16)),
                rule("mlp.c_fc", 3, w=TensorPatch(bits=8),
                     a=TensorPatch(granularity=PerGroup(8, True))))
    assert p["block.1.res_sum"].activation.bits == 16
    assert p["block.1.res_sum"].rule("activation") == "r.qrec:2:1"
    assert p["block.1.res_attn"].activation.bits == 8
    fc = p["block.0.mlp.c_fc"]
    assert fc.weight.bits == 8 and fc.weight.observer == MSE()  # kept from rule 1
    assert fc.weight.granularity == PerChannel()
    assert fc.activation.granularity == PerGroup(8, True) and fc.activation.bits == 8
    assert fc.decided_by["activation"] == {"bits": "r.qrec:1:1", "granularity": "r.qrec:3:1"}
    assert p["block.0.attn.probs"].weight is None


def test_skip_then_requantize():
    p = plan_of(rule("*", 1, w=TensorPatch(bits=8), a=TensorPatch(bits=8)),
                rule("lm_head", 2, skip=True))
    assert not p["lm_head"].weight.quantized and not p["lm_head"].activation.quantized
    assert p["block.0.attn.out"].weight.quantized


def test_a_later_width_replaces_an_earlier_float_dtype():
    """Precision is one attribute: `* -> fp16` then `mlp.c_fc -> w8` quantizes c_fc's
    weight (the fp16 used to win while explain named line 2 as deciding the bits)."""
    p = plan_of(rule("*", 1, w=TensorPatch(float_dtype="fp16"), a=TensorPatch(float_dtype="fp16")),
                rule("mlp.c_fc", 2, w=TensorPatch(bits=8)))
    fc = p["block.0.mlp.c_fc"]
    assert fc.weight.quantized and fc.weight.bits == 8
    assert fc.decided_by["weight"] == {"bits": "r.qrec:2:1"}
    assert fc.activation.float_dtype == "fp16" and fc.rule("activation") == "r.qrec:1:1"
    assert p["block.0.attn.out"].weight.float_dtype == "fp16"
    # and back: a later float dtype replaces earlier bits, and is the deciding rule
    p = plan_of(rule("*", 1, w=TensorPatch(bits=8)), rule("lm_head", 2, w=TensorPatch(float_dtype="bf16")))
    assert not p["lm_head"].weight.quantized and p["lm_head"].rule("weight") == "r.qrec:2:1"
    assert not p.warnings  # rule 1 still decides every other node: not shadowed


def test_rule_column_is_the_last_rule_in_order_not_in_text_order():
    """Without a precision rule, the deciding rule is the last that set anything: line 10
    after line 9 (the locations used to be compared as text, where '9' > '10')."""
    p = plan_of(rule("mlp.c_fc", 9, w=TensorPatch(symmetric=False), optional=True),
                rule("mlp.c_fc", 10, w=TensorPatch(observer=MSE())))
    assert p["block.0.mlp.c_fc"].rule("weight") == "r.qrec:10:1"


def test_unmatched_rule_is_an_error_with_suggestions():
    with pytest.raises(PlanError) as e:
        plan_of(rule("mlp.c_fcc", 4, a=TensorPatch(bits=16)))
    d = e.value.diagnostics[0]
    assert (d.line, d.col) == (4, 1)
    assert "matches no node" in d.message and "mlp.c_fc" in d.hint


def test_optional_rule_may_match_nothing():
    p = plan_of(rule("mlp.gate", 1, optional=True, w=TensorPatch(bits=4)))
    assert p.warnings == ()


def test_weight_options_on_weightless_node_name_the_node():
    with pytest.raises(PlanError) as e:
        plan_of(rule("softmax", 2, kind="op", w=TensorPatch(bits=8)))
    assert "block.0.attn.probs" in e.value.diagnostics[0].message
    assert "no weights" in e.value.diagnostics[0].message


def test_all_errors_reported():
    with pytest.raises(PlanError) as e:
        plan_of(rule("nope", 1, a=TensorPatch(bits=8)), rule("attn.probs", 2, w=TensorPatch(bits=8)))
    assert [d.line for d in e.value.diagnostics] == [1, 2]


def test_shadowed_rule_warns_naming_both():
    p = plan_of(rule("block.0.res_sum", 1, a=TensorPatch(bits=16)),
                rule("*", 2, w=TensorPatch(bits=8), a=TensorPatch(bits=8)))
    (w,) = p.warnings
    assert w.severity == "warning" and w.line == 1 and "line 2" in w.message


def test_partially_overridden_rule_is_not_shadowed():
    p = plan_of(rule("block.*.res_sum", 1, a=TensorPatch(bits=16)),
                rule("block.0.res_sum", 2, a=TensorPatch(bits=8)))
    assert p.warnings == ()


def test_type_linear_picks_conv1d():
    p = plan_of(rule("Linear", 1, kind="type", w=TensorPatch(bits=4)))
    assert p["block.0.mlp.c_fc"].weight.bits == 4  # Conv1D
    assert p["embed"].weight.quantized is False


def test_plan_json_round_trip_and_graph_check():
    p = plan_of(rule("*", 1, w=TensorPatch(bits=8), a=TensorPatch(bits=8)))
    q = QuantPlan.from_json(p.to_json())
    assert q.entries == p.entries and q.hash() == p.hash()
    q.check_graph(gpt2_like())
    with pytest.raises(PlanError):
        q.check_graph(Named(gpt2_like().nodes, graph_hash="other"))


def test_alias_selects_gated_mlp_equivalents():
    assert glob_matches("mlp.c_fc", "block.0.mlp.up") and glob_matches("mlp.c_fc", "block.0.mlp.gate")
    assert glob_matches("block.*.mlp.c_proj", "block.2.mlp.down")
    assert glob_matches("attn.qkv", "block.1.attn.k") and not glob_matches("attn.q", "block.1.attn.qkv")


def test_options_on_float_tensors_warn():
    p = plan_of(rule("mlp.c_fc", 3, w=TensorPatch(bits=8),
                     a=TensorPatch(granularity=PerGroup(8, True))))
    (w,) = p.warnings
    assert w.line == 3 and "activation options (granularity) have no effect" in w.message
