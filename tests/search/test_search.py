"""qdsl search on tiny models: candidates, units, the allocator, the written recipe."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qdsl import cli
from qdsl.compiler.render import storage
from qdsl.errors import RecipeError
from qdsl.graph.capture import capture
from qdsl.graph.naming import name_graph
from qdsl.lang.formatter import format_text
from qdsl.lang.loader import parse_recipe
from qdsl.models import zoo
from qdsl.plan import build_plan
from qdsl.search.allocate import BudgetError, allocate
from qdsl.search.candidates import parse_candidates, split
from qdsl.search.sensitivity import Prober, spearman
from qdsl.search.units import Choice, Space, Unit, build_space
from qdsl.search.write import chosen_specs, index_set, recipe_text
from tests.tiny import tiny, tiny_ids

CANDS = "w8a8; w4a8 group(16); w8a16; skip"


def _graph(family: str, model=None):
    model = model if model is not None else tiny(family)
    cap = capture(model)
    return model, cap, name_graph(cap)


# ----------------------------------------------------------------------- candidates

def test_candidates_split_on_commas_only_before_a_new_spec():
    assert [t.strip() for _, t in split("w8a8, w4a16 group(128), skip")] == \
        ["w8a8", "w4a16 group(128)", "skip"]
    assert [t for _, t in split("w8 sym, a8 asym; w4")] == ["w8 sym, a8 asym", " w4"]
    c = parse_candidates("w8 sym mse, a8 asym; w4 group(64); skip")
    assert [x.weight_clause() for x in c] == ["w8 sym mse", "w4 group(size=64)", "w32"]
    assert [x.act_clause() for x in c] == ["a8 asym", "a32", "a32"]
    assert c[0].activation.bits == 8 and not c[0].activation.symmetric
    assert not c[1].activation.quantized and not c[2].weight.quantized


@pytest.mark.parametrize("text, col, words", [
    ("w8a8, w4 per_chanel", 10, "unknown option `per_chanel`"),
    ("w8a8; w4 gptq", 7, "GPTQ / AWQ rounding is not searched"),
    ("w8a8; w8a8", 7, "repeats an earlier candidate"),
    ("w8a8;  ;w4", 8, "empty candidate"),
])
def test_bad_candidate_is_located_in_the_candidates_text(text, col, words):
    with pytest.raises(RecipeError) as e:
        parse_candidates(text)
    d = e.value.diagnostics[0]
    assert (d.file, d.line, d.col) == ("--candidates", 1, col) and words in d.message
    assert d.source_line == text


# ----------------------------------------------------------------------- units

def test_units_tie_the_linears_reading_one_tensor():
    _, cap, named = _graph("llama")
    sp = build_space(cap.gm, named, parse_candidates(CANDS))
    groups = {u.key: u.linears for u in sp.units}
    assert groups["block.0.ln_1"] == ("block.0.attn.q", "block.0.attn.k", "block.0.attn.v")
    assert groups["block.1.ln_2"] == ("block.1.mlp.gate", "block.1.mlp.up")
    assert groups["block.0.mlp.mul"] == ("block.0.mlp.down",)
    assert all(len(u.choices) == 4 for u in sp.units)
    sp_all = build_space(cap.gm, named, parse_candidates(CANDS), "all")
    extra = {u.key for u in sp_all.units} - set(groups)
    assert {"block.0.res_sum", "block.1.attn.probs", "block.0.attn.scores"} <= extra
    # an activation unit takes the distinct activation clauses: a8, a16, float
    assert len(next(u for u in sp_all.units if u.key == "block.0.res_sum").choices) == 3


def test_a_weight_tied_to_the_float_embedding_costs_its_codes_only_when_quantized():
    """lm_head shares wte, which stays float: kept fp32 it reads wte's table for nothing;
    quantized it is a copy of its own beside the float table (as the int8 lowering
    stores it), priced like any other weight."""
    model, cap, named = _graph("gpt2")
    sp = build_space(cap.gm, named, parse_candidates(CANDS))
    head = next(u for u in sp.units if "lm_head" in u.linears)
    vocab, hidden = model.lm_head.weight.shape
    by = {sp.candidates[c.candidate].text: c.bytes for c in head.choices}
    assert by["skip"] == 0.0
    assert all(b >= vocab * hidden * 4 / 8 for t, b in by.items() if t != "skip"), by


# ----------------------------------------------------------------------- allocator

def _random_space(sizes: list[list[int]]) -> Space:
    units = tuple(Unit(f"u{i}", (f"l{i}",), None, None,
                       tuple(Choice(j, None, None, float(b)) for j, b in enumerate(row)))
                  for i, row in enumerate(sizes))
    return Space(units, (), 100.0, 1000, 0.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(1, 40), st.floats(0, 10)), min_size=1,
                         max_size=3), min_size=1, max_size=5),
       st.integers(0, 200))
def test_allocation_is_the_exact_optimum_under_the_budget(rows, extra):
    sp = _random_space([[b for b, _ in r] for r in rows])
    scores = [[s for _, s in r] for r in rows]
    budget = sp.fixed_bytes + sum(min(b for b, _ in r) for r in rows) + extra
    a = allocate(sp, scores, budget)
    assert a.bytes <= budget
    best = min(sum(scores[u][c] for u, c in enumerate(p))
               for p in itertools.product(*[range(len(r)) for r in rows])
               if sp.bytes_of(list(p)) <= budget)
    assert a.score == pytest.approx(best, abs=1e-6)


def test_infeasible_budget_names_the_minimum():
    sp = _random_space([[10, 20], [5, 7]])
    with pytest.raises(BudgetError, match=r"needs 0\.000115 MB .* allows 0\.000114 MB"):
        allocate(sp, [[1, 0], [1, 0]], 114.0)


# ----------------------------------------------------------------------- end to end on tiny

def _search(family: str, cands: str, budget_of, act_bits=None, model=None):
    model, cap, named = _graph(family, model)
    sp = build_space(cap.gm, named, parse_candidates(cands))
    ids = tiny_ids(model, 8, 16)
    pr = Prober(cap.gm, named, sp)
    pr.observe(ids, 4, progress=False)
    sens = pr.score(ids, 4, progress=False)
    a = allocate(sp, sens.scores, budget_of(sp), act_bits)
    return model, sp, sens, a


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_found_recipe_round_trips_and_plans_to_the_chosen_specs(family):
    budget = lambda sp: sp.fixed_bytes + sum(sorted(c.bytes for c in u.choices)[1]
                                             for u in sp.units)
    model, sp, sens, a = _search(family, CANDS, budget)
    assert sens.base_loss > 0 and all(s >= 0 for row in sens.scores for s in row)
    text = recipe_text(sp, a.picks, 2, ["header", "Command: qdsl search --model x"])
    assert format_text(text) == text
    recipe = parse_recipe(text)
    _, cap, named = _graph(family, model)   # a fresh capture: no probes
    plan = build_plan(recipe, named)
    want = chosen_specs(sp, a.picks)
    for e in plan.entries:
        got = {"weight": e.weight, "activation": e.activation}
        for kind, spec in want.get(e.name, {}).items():
            assert got[kind] == spec, (e.name, kind)
        if e.name not in want and e.weight is not None:
            assert not e.weight.quantized, e.name
    # the size the allocator counted is the plan's storage as explain counts it
    assert storage(cap.gm, named, plan).after == pytest.approx(a.bytes, abs=0.5)
    assert a.bytes <= budget(sp)


def test_tied_linears_share_one_spec_in_the_plan():
    budget = lambda sp: sp.fixed_bytes + sum(c.bytes for c in sp.units[0].choices[:1]) + sum(
        min(c.bytes for c in u.choices) for u in sp.units[1:])
    model, sp, _, a = _search("llama", "w8a8; w4a8 group(16)", budget)
    _, cap, named = _graph("llama", model)
    plan = build_plan(parse_recipe(recipe_text(sp, a.picks, 2, [])), named)
    for b in range(2):
        assert len({plan[f"block.{b}.attn.{x}"].weight for x in "qkv"}) == 1
        assert plan[f"block.{b}.mlp.gate"].weight == plan[f"block.{b}.mlp.up"].weight


def test_an_injected_outlier_is_kept_at_high_precision():
    model = tiny("llama")
    with torch.no_grad():   # one channel of block 1's act(gate) * up (down's input) 200x larger
        model.model.layers[1].mlp.up_proj.weight[5] *= 200.0
    # one unit of 9 may read its input at 16 bits
    _, sp, sens, a = _search("llama", "w8a8; w8a16", lambda sp: 1e12, act_bits=(8 * 8 + 16) / 9,
                             model=model)
    picked = {u.key: sp.candidates[u.choices[i].candidate].text for u, i in zip(sp.units, a.picks)}
    assert picked["block.1.mlp.mul"] == "w8a16"
    assert sum(v == "w8a16" for v in picked.values()) == 1


def test_index_set_and_spearman():
    assert index_set([0, 1, 2, 5, 7, 8]) == "[0-2,5,7-8]" and index_set([4]) == "4"
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) is None


# ----------------------------------------------------------------------- CLI

def test_cli_bad_candidate_is_one_located_error(capsys, tmp_path):
    code = cli.main(["search", "--model", "nope", "--budget", "4", "--candidates",
                     "w8a8; w4 per_chanel", "-o", str(tmp_path / "f.qrec")])
    err = capsys.readouterr().err
    assert code != 0 and "--candidates:1:10: error: unknown option `per_chanel`" in err
    assert "Traceback" not in err and not (tmp_path / "f.qrec").exists()


def test_cli_infeasible_budget_says_the_minimum(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "load_model", lambda name, **kw: (tiny("llama"), None))
    code = cli.main(["search", "--model", "tiny", "--budget", "2", "--candidates",
                     "w8a8; w4a8 group(16)", "--seq-len", "32", "-o", str(tmp_path / "f.qrec")])
    err = capsys.readouterr().err
    assert code != 0 and "budget cannot be met" in err and "needs" in err
    assert "Traceback" not in err and not (tmp_path / "f.qrec").exists()


def test_cli_windows_longer_than_the_graph_takes_is_an_option_error(capsys, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setattr(zoo, "load_model", lambda name, **kw: (tiny("llama"), None))
    code = cli.main(["search", "--model", "tiny", "--budget", "8", "--candidates", "w8a8",
                     "--seq-len", "64", "-o", str(tmp_path / "f.qrec")])
    err = capsys.readouterr().err
    assert code != 0 and "--seq-len" in err and "63 tokens" in err and "Traceback" not in err
