"""Seed findings as checks (qdsl.study.findings) and the generated results document
(qdsl.study.report): verdicts from synthetic tables, blocks rewritten, prose kept."""

from __future__ import annotations

import json

import pytest

from qdsl.errors import QdslError
from qdsl.study.findings import (FINDINGS, NOISE, NOT_REPRODUCED, NOT_RUN, REPRODUCED, Rows,
                                 evaluate, render)
from qdsl.study.report import SKELETON, update_doc


def _row(label, es, em=5.0, ppl=10.0, **kw):
    return {"label": label, "es": es, "em": em, "ppl": ppl, **kw}


def _verdict(tables, claim_start, n=100):
    return next(f for f in evaluate(tables, n) if f["claim"].startswith(claim_start))


def test_margin_shrinks_with_samples():
    assert Rows({}, 100).margin == pytest.approx(2 * 2 ** 0.5 * 30 / 10)
    assert Rows({}, 400).margin == pytest.approx(Rows({}, 100).margin / 2)


@pytest.mark.parametrize("w8a8, expected", [(41.0, REPRODUCED), (2.0, NOT_REPRODUCED)])
def test_near_lossless(w8a8, expected):
    t = {"storti-2": [_row("Baseline", 42.0), _row("W8A8", w8a8)]}
    assert _verdict(t, "naive W8A8")["verdict"] == expected


@pytest.mark.parametrize("per_col, expected", [(40.0, REPRODUCED), (33.0, NOISE),
                                               (20.0, NOT_REPRODUCED)])
def test_better_needs_the_noise_margin(per_col, expected):
    t = {"wei-4": [_row("Static (per-column)", per_col), _row("Static (per-tensor)", 30.0)]}
    f = _verdict(t, "static per-column")
    assert f["verdict"] == expected and "ΔES" in f["evidence"]
    assert ("perplexity" in f["evidence"]) == (expected == NOISE)


def test_perplexity_witness_when_es_cannot_tell():
    t = {"wei-4": [_row("Static (per-column)", 33.0, ppl=10.0),
                   _row("Static (per-tensor)", 30.0, ppl=12.0)]}
    assert _verdict(t, "static per-column")["evidence"].endswith(
        "perplexity favours Static (per-column)")
    t["wei-4"][1]["ppl"] = 10.2
    assert _verdict(t, "static per-column")["evidence"].endswith("cannot tell either")


def test_humaneval_pass_at_1_is_printed_beside_es():
    he = {"problems": 82, "passed": 26, "pass@1": 26 / 82}
    t = {"wei-4": [_row("Dynamic (per-tensor)", 40.0, humaneval=he),
                   _row("Full precision", 42.0)]}
    f = _verdict(t, "dynamic per-tensor")
    assert "Dynamic (per-tensor): ES 40.0, EM 5, ppl 10.0, HumanEval pass@1 31.7% of 82" \
        in f["evidence"]
    assert "Full precision: ES 42.0, EM 5, ppl 10.0;" in f["evidence"]


def test_wei_claims_are_decided_by_pass_at_1_when_every_row_has_it():
    def he(passed):
        return {"problems": 82, "passed": passed, "pass@1": passed / 82}
    t = {"wei-4": [_row("Static (per-column)", 55.9, humaneval=he(41)),
                   _row("Static (per-tensor)", 52.4, humaneval=he(21)),
                   _row("Full precision", 57.2, humaneval=he(49)),
                   _row("Dynamic (per-tensor)", 51.6, humaneval=he(43))]}
    f = _verdict(t, "static per-column", n=20)   # ES alone: +3.5, within 19 points of noise
    assert f["verdict"] == REPRODUCED and "Δpass@1 +24.4" in f["evidence"]
    assert "decided by HumanEval" in f["evidence"]
    assert _verdict(t, "dynamic per-tensor", n=20)["verdict"] == REPRODUCED  # -7.3 < margin
    t["wei-4"][3]["humaneval"] = he(20)
    assert _verdict(t, "dynamic per-tensor", n=20)["verdict"] == NOT_REPRODUCED
    del t["wei-4"][1]["humaneval"]                  # one row without HumanEval: ES decides
    assert _verdict(t, "static per-column", n=20)["verdict"] == NOISE
    assert "decided by HumanEval" in render(evaluate(t, 20), 20)


def test_calibration_size_is_decided_on_three_of_four_rows():
    rows = [_row("32 windows", 41.1), _row("128 windows", 42.0), _row("512 windows", 41.1)]
    f = _verdict({"wei-fig7": rows[:2]}, "the calibration-set size")
    assert f["verdict"] == NOT_RUN
    f = _verdict({"wei-fig7": rows}, "the calibration-set size")
    assert f["verdict"] == REPRODUCED and f["evidence"].endswith(
        "ES spread 0.9 (2048 windows not run yet)")
    rows.append(_row("2048 windows", 20.0))
    assert _verdict({"wei-fig7": rows}, "the calibration-set size")["verdict"] == NOT_REPRODUCED


def test_recovers_share_of_the_loss():
    t = {"storti-3": [_row("Baseline (fp32)", 42.0), _row("Naive W8A8", 2.0),
                      _row("Residual Sum of block", 30.0)]}
    assert _verdict(t, "keeping the block's residual")["verdict"] == REPRODUCED
    t["storti-3"][2]["es"] = 10.0
    f = _verdict(t, "keeping the block's residual")
    assert f["verdict"] == NOT_REPRODUCED and "recovers 8.0 of 40.0" in f["evidence"]


def test_missing_rows_are_not_run():
    t = {"wei-5": [_row("Full precision", 42.0), {"label": "W8A4", "es": None}]}
    f = _verdict(t, "W8A4 collapses")
    assert f["verdict"] == NOT_RUN and "W8A4" in f["evidence"]
    assert all(f["verdict"] == NOT_RUN for f in evaluate({}, 100))


def test_robustness_compares_drops():
    """Without per-sample scores (an older cache) the drops are compared by direction."""
    rob = lambda d: {"robust": {"es_drop_pct": d}}  # noqa: E731
    t = {"wei-7": [_row("FP", 40, **rob(2.0)), _row("D (T)", 39, **rob(5.0)),
                   _row("S (C)", 38, **rob(4.0)), _row("S (T)", 30, **rob(9.0))]}
    f = _verdict(t, "quantized models lose more")
    assert f["verdict"] == REPRODUCED and "direction only" in f["evidence"]
    t["wei-7"][0]["robust"]["es_drop_pct"] = 6.0
    assert _verdict(t, "quantized models lose more")["verdict"] == NOISE  # mixed
    t["wei-7"][0]["robust"]["es_drop_pct"] = 20.0
    assert _verdict(t, "quantized models lose more")["verdict"] == NOT_REPRODUCED


def _robust(n, drops, es=50.0):
    """A robust result over n samples where sample i loses drops[i] ES points."""
    ps = [{"id": str(i), "es_clean": es, "es": es - d} for i, d in enumerate(drops)]
    pct = 100 * sum(drops) / n / es
    return {"robust": {"n": n, "es": es, "es_drop_pct": pct, "perturbed_samples": ps}}


def test_robustness_is_paired_over_samples():
    """A larger mean drop counts only beyond 2 paired standard errors."""
    fp = _robust(20, [0.0] * 10)
    noisy = _robust(20, [30.0, -25.0, 20.0, -10.0, 15.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    clear = _robust(20, [10.0] * 10)
    rows = lambda q: {"wei-7": [_row("FP", 50, **fp), _row("D (T)", 50, **q),  # noqa: E731
                                _row("S (C)", 50, **q), _row("S (T)", 50, **q)]}
    f = _verdict(rows(noisy), "quantized models lose more", n=20)
    assert f["verdict"] == NOISE and "±" in f["evidence"], f
    assert _verdict(rows(clear), "quantized models lose more", n=20)["verdict"] == REPRODUCED
    gain = _robust(20, [-10.0] * 10)
    assert _verdict(rows(gain), "quantized models lose more", n=20)["verdict"] == NOT_REPRODUCED


def test_clean_scores_come_from_the_quality_job():
    from qdsl.study.tables import _with_clean_scores

    rob = {"perturbed_samples": [{"id": "a", "es": 10.0}]}
    got = _with_clean_scores(rob, [{"id": "a", "es": 40.0}, {"id": "b", "es": 5.0}])
    assert got["perturbed_samples"][0]["es_clean"] == 40.0
    assert _with_clean_scores(rob, [{"id": "b", "es": 5.0}]) is rob  # no match: unchanged


def test_every_finding_names_rows_of_its_table():
    from qdsl.study.tables import TABLES

    for f in FINDINGS:
        assert f.table in TABLES
        labels = {r.label for r in TABLES[f.table].rows}
        full = {f.table: [_row(x, 40.0, robust={"es_drop_pct": 1.0}) for x in labels]}
        assert evaluate(full, 100)[FINDINGS.index(f)]["verdict"] != NOT_RUN, f.claim


def test_render_groups_by_paper():
    md = render(evaluate({}, 100), 100)
    assert "**Storti 2023**" in md and "**Wei et al. 2023**" in md
    assert f"not run yet: {len(FINDINGS)}" in md


def _results_dir(tmp_path):
    d = tmp_path / "sweep"
    d.mkdir(exist_ok=True)
    res = {"config": {"model": "m", "bench": "b", "bench_seed": 0, "ppl_windows": 2,
                      "threads": 1}, "n_samples": 4,
           "machine": {"cpu": "cpu", "cores": 2, "torch": "t", "python": "p"},
           "updated": "now", "job_seconds_total": 120.0,
           "runs": {"k": {"seconds": 120.0}}, "tables": {}, "failed": {}}
    (d / "results.json").write_text(json.dumps(res))
    (d / "tables.md").write_text("# title\n\nintro\n\n### t1: a table\n\n| a |\n|---|\n")
    return d


def test_update_doc_rewrites_blocks_and_keeps_prose(tmp_path):
    doc = tmp_path / "results.md"
    update_doc(doc, _results_dir(tmp_path), "qdsl sweep --table all -o X --doc D")
    text = doc.read_text()
    assert "### t1: a table" in text and "# title" not in text
    assert "qdsl sweep --table all -o X --doc D" in text and "1 finished jobs" in text
    assert "not run yet" in text
    doc.write_text(text.replace("(Write the discussion here; regenerating leaves it alone.)",
                                "My discussion."))
    update_doc(doc, _results_dir(tmp_path), "cmd2")
    again = doc.read_text()
    assert "My discussion." in again and "cmd2" in again and "qdsl sweep --table" not in again
    assert again.count("<!-- qdsl:tables -->") == 1


def test_update_doc_errors(tmp_path):
    with pytest.raises(QdslError, match="no sweep results"):
        update_doc(tmp_path / "d.md", tmp_path / "nothing", "cmd")
    doc = tmp_path / "d.md"
    doc.write_text(SKELETON.replace("<!-- qdsl:findings -->\n<!-- /qdsl:findings -->\n", ""))
    with pytest.raises(QdslError, match="findings"):
        update_doc(doc, _results_dir(tmp_path), "cmd")


def test_seed_files_hold_every_table_and_claim():
    """The seed data (qdsl/study/data/*.toml): tables in the order of --table all, a
    paper column a row lacks reads as null, claims grouped by paper in file order."""
    from qdsl.study.findings import CHECKS, _finding
    from qdsl.study.tables import TABLES

    assert list(TABLES) == ["storti-1", "storti-2", "storti-3", "storti-4", "wei-4", "wei-5",
                            "wei-7", "int8", "wei-fig7"]
    diag = TABLES["storti-2"].rows[-1]
    assert diag.paper == {"ES": None, "EM": None} and diag.recipe.startswith("storti/")
    assert TABLES["storti-2"].rows[0].paper == {"ES": 41, "EM": 17, "Compression": "1x"}
    assert TABLES["wei-5"].rows[1].paper == {"pass@1": 22.5}
    assert all(r.own_calib for r in TABLES["wei-fig7"].rows if r.recipe)
    assert [f.paper for f in FINDINGS] == sorted(f.paper for f in FINDINGS)
    assert {f.check.func for f in FINDINGS} <= set(CHECKS.values())
    with pytest.raises(ValueError, match="unknown check 'bigger'"):
        _finding("P", {"claim": "c", "table": "t", "check": "bigger", "args": []})
