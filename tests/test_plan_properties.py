"""Properties of the cascade and the planner on random rules over random named graphs
(strategies: ``graphs_and_rules``; no model, milliseconds an example).

Each rule list goes through the language (rendered, then parsed: rule i is line i+1),
the planner, and explain's rows, and is compared with a reference written here:

(a) the plan is a reference fold of the rules (for each node, start from nothing; for
    each rule in order that selects it, override exactly the attributes the rule sets),
    and the planner refuses exactly the rules that select nothing or put weight options
    on nodes without weights;
(b) a later rule that sets an attribute wins: it decides that attribute on every node
    it selects, what earlier rules said about it no longer matters, its value shows;
(c) explain's deciding rule for each attribute of each node is the last rule that set it.
"""

from __future__ import annotations

from dataclasses import fields, replace

import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import graphs_and_rules, plannable, planner_rules, ref_selects

from qdsl.errors import PlanError
from qdsl.compiler.render import rows
from qdsl.lang import parse_recipe
from qdsl.lang.formatter import render_rule
from qdsl.plan import build_plan
from qdsl.config.spec import FLOAT_BITS, PRECISION, PerToken, TensorPatch, resolve

FILE = "r.qrec"
KINDS = ("weight", "activation")


def recipe_of(rules):
    """The rules as recipe text, parsed back (rule i at line i + 1)."""
    text = "".join(render_rule(r) + "\n" for r in rules)
    recipe = parse_recipe(text, FILE)
    assert recipe.rules == tuple(rules), text
    return recipe


def loc(i: int) -> str:
    return f"{FILE}:{i + 1}:1"


def said(rule, kind: str) -> dict:
    """Attribute -> value: what ``rule`` sets on tensors of ``kind`` (skip: float)."""
    if rule.skip:
        return {"bits": FLOAT_BITS}
    patch = getattr(rule, kind)
    return {f.name: getattr(patch, f.name) for f in fields(patch)
            if getattr(patch, f.name) is not None}


PRECISION_FIELDS = set(PRECISION)


def kinds_of(node) -> tuple[str, ...]:
    return KINDS if node.has_weight else ("activation",)


def reference_fold(rules, named) -> dict:
    """node -> kind -> attribute -> (value, index of the rule that set it last)."""
    out = {}
    for n in named.nodes:
        out[n.name] = {}
        for kind in kinds_of(n):
            attrs: dict = {}
            for i, rule in enumerate(rules):
                if ref_selects(rule.selector, n):
                    mine = said(rule, kind)
                    if PRECISION_FIELDS & mine.keys():  # one attribute: either replaces both
                        for attr in PRECISION_FIELDS:
                            attrs.pop(attr, None)
                    for attr, value in mine.items():
                        attrs[attr] = (value, i)
            out[n.name][kind] = attrs
    return out


def reference_errors(rules, named) -> list[int]:
    """Lines of the rules the planner must refuse."""
    bad = []
    for i, rule in enumerate(rules):
        hits = [n for n in named.nodes if ref_selects(rule.selector, n)]
        if not hits and not rule.selector.optional:
            bad.append(i + 1)
        elif hits and not rule.skip and not rule.weight.is_empty() \
                and not any(n.has_weight for n in hits):
            bad.append(i + 1)
    return bad


def spec_of(kind: str, attrs: dict):
    return resolve(kind, TensorPatch(**{a: v for a, (v, _) in attrs.items()}))


# --- (a) the plan is the reference fold -------------------------------------------


@given(st.booleans().flatmap(lambda ok: graphs_and_rules(plannable_only=ok)))
def test_plan_is_the_reference_fold(case):
    named, rules = case
    recipe = recipe_of(rules)
    errors = reference_errors(rules, named)
    if errors:
        with pytest.raises(PlanError) as e:
            build_plan(recipe, named)
        assert sorted(d.line for d in e.value.diagnostics) == errors
        return
    plan = build_plan(recipe, named)
    fold = reference_fold(rules, named)
    assert [e.name for e in plan.entries] == [n.name for n in named.nodes]
    for n in named.nodes:
        entry = plan[n.name]
        if not n.has_weight:
            assert entry.weight is None and "weight" not in entry.decided_by
        for kind in kinds_of(n):
            attrs = fold[n.name][kind]
            assert getattr(entry, kind) == spec_of(kind, attrs), (n.name, kind)
            assert entry.decided_by.get(kind, {}) == {a: loc(i) for a, (_, i) in attrs.items()}


# --- (b) a later rule that sets an attribute wins ---------------------------------


def _strike(rule, attrs: dict[str, set], named):
    """``rule`` without the attributes in ``attrs`` (kind -> names); None if nothing is left."""
    if rule.skip:  # skip = bits float on both kinds
        patches = {k: TensorPatch() if "bits" in attrs[k] else TensorPatch(bits=FLOAT_BITS)
                   for k in KINDS}
        rule = replace(rule, skip=False, **patches)
    else:
        rule = replace(rule, **{k: replace(getattr(rule, k), **{a: None for a in attrs[k]})
                                for k in KINDS})
    if rule.weight.is_empty() and rule.activation.is_empty():
        return None
    if rule.activation.is_empty() and not any(
            n.has_weight for n in named.nodes if ref_selects(rule.selector, n)):
        return None  # only weight options left, on nodes without weights
    if not any(n.has_weight for n in named.nodes if ref_selects(rule.selector, n)):
        rule = replace(rule, weight=TensorPatch())
    return rule


@given(graphs_and_rules(plannable_only=True), st.data())
def test_a_later_rule_that_sets_an_attribute_wins(case, data):
    named, rules = case
    last = plannable(data.draw(planner_rules(named), label="last rule"), named)
    rules = rules + [last]
    plan = build_plan(recipe_of(rules), named)
    fold = reference_fold(rules, named)
    hits = [n for n in named.nodes if ref_selects(last.selector, n)]
    sets = {k: set(said(last, k)) for k in KINDS}

    # earlier values of the attributes it sets do not matter on the nodes it selects
    struck = [r for r in (_strike(r, sets, named) for r in rules[:-1]) if r is not None]
    again = build_plan(recipe_of(struck + [last]), named)
    for n in hits:
        assert (again[n.name].weight, again[n.name].activation) == \
            (plan[n.name].weight, plan[n.name].activation), n.name

    for n in hits:
        entry = plan[n.name]
        for kind in kinds_of(n):
            mine, spec = said(last, kind), getattr(entry, kind)
            # it decided every attribute it sets
            assert {a: entry.decided_by[kind][a] for a in mine} == {a: loc(len(rules) - 1)
                                                                    for a in mine}
            # and its values show in the resolved spec
            if mine.get("bits") == FLOAT_BITS or "float_dtype" in mine:
                assert not spec.quantized
            if "float_dtype" in mine:
                assert spec.float_dtype == mine["float_dtype"]
            if "bits" in mine and mine["bits"] != FLOAT_BITS and "float_dtype" not in mine:
                assert spec.bits == mine["bits"]  # an earlier fp16 does not hold it back
            if spec.quantized:
                for attr in ("symmetric", "granularity", "observer"):
                    if attr in mine:
                        assert getattr(spec, attr) == mine[attr], (n.name, kind, attr)
                if "dynamic" in mine and not isinstance(spec.granularity, PerToken):
                    assert spec.dynamic == mine["dynamic"]


# --- (c) explain names the last rule that set each attribute ------------------------


def _last_setter(rules, node, kind: str, attr: str) -> str | None:
    """The last rule that set ``attr``; for a precision field, None when a later rule
    replaced the precision with the other field (``fp16`` then ``w8``: bits only)."""
    for i in reversed(range(len(rules))):
        if not ref_selects(rules[i].selector, node):
            continue
        mine = said(rules[i], kind)
        if attr in mine:
            return loc(i)
        if attr in PRECISION_FIELDS and PRECISION_FIELDS & mine.keys():
            return None
    return None


def _index(rules, location: str) -> int:
    return next(i for i in range(len(rules)) if loc(i) == location)


@given(graphs_and_rules(plannable_only=True))
def test_explain_names_the_last_rule_that_set_each_attribute(case):
    named, rules = case
    plan = build_plan(recipe_of(rules), named)
    attrs = [f.name for f in fields(TensorPatch)]
    for row in rows(plan, named):
        node = named[row["name"]]
        deciding = {}
        for kind in kinds_of(node):
            deciding[kind] = {a: r for a in attrs
                              if (r := _last_setter(rules, node, kind, a)) is not None}
            assert row["decided_by"].get(kind, {}) == deciding[kind], (node.name, kind)
        assert node.has_weight or "weight" not in row["decided_by"]
        # the rule column names the rule that set the precision; where none did, the last
        # rule that set anything; '-' when no rule touched the tensor
        cell = {k: d.get("bits") or d.get("float_dtype")
                or max(d.values(), key=lambda at: _index(rules, at), default="-")
                for k, d in deciding.items()}
        w, a = cell.get("weight"), cell["activation"]
        assert row["rule"] == (a if w is None or w == a else f"w {w}; a {a}"), node.name
