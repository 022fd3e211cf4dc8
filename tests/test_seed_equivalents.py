"""Seed-table rows that share another recipe's job (``runs_as`` in the seed files)
really compile to that recipe's plan, and every such pair is declared, so a sweep never
runs the same quantization twice nor reports one recipe's numbers for another's."""

import json

import pytest
from tiny import tiny_captured

from qdsl.graph.naming import name_graph
from qdsl.lang import load_recipe
from qdsl.plan import build_plan
from qdsl.study.jobs import Job, recipe_path
from qdsl.study.tables import TABLES

FAMILIES = ("llama", "gpt2")     # the architectures the seed tables run on


def _meaning(recipe: str, named):
    """What a job computes from a recipe on a graph: the resolved per-node specs (not
    which rule decided them), the fitted transforms and the settings."""
    r = load_recipe(recipe_path(recipe))
    plan = build_plan(r, named)
    return plan.entries, plan.transforms, json.dumps(r.settings.to_json(), sort_keys=True)


@pytest.fixture(scope="module", params=FAMILIES)
def named(request):
    return name_graph(tiny_captured(request.param)[1])


ROWS = [r for t in TABLES.values() for r in t.rows if r.recipe]


@pytest.mark.parametrize("row", [r for r in ROWS if r.runs_as], ids=lambda r: r.recipe)
def test_a_row_runs_as_a_recipe_with_its_plan(row, named):
    assert _meaning(row.recipe, named) == _meaning(row.runs_as, named)
    assert Job.of(row).recipe == recipe_path(row.runs_as)


def test_every_pair_of_equal_plans_shares_one_job(named):
    """Two table recipes with one plan but different recipe hashes (so different cache
    keys) must be joined by ``runs_as``; recipes with one hash share a job already."""
    jobs_of: dict = {}
    for row in ROWS:
        if row.lower:
            continue       # real lowering rows run their own job (qdsl bench)
        job = Job.of(row)
        key = (_meaning(row.recipe, named), load_recipe(job.recipe).hash())
        jobs_of.setdefault(key[0], set()).add(key[1])
    split = [h for h in jobs_of.values() if len(h) > 1]
    assert not split, f"recipes with one plan run as {len(split)} groups of separate jobs"


def test_the_equality_tells_plans_apart(named):
    """A different quantization is never passed off as a row: mutating a target breaks
    the equality above (the check is not vacuous)."""
    row = next(r for r in ROWS if r.runs_as == "storti/t2_w8a8.qrec")
    assert _meaning(row.recipe, named) != _meaning("storti/t2_w8a16.qrec", named)
