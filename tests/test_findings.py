"""Seed findings as checks (qdsl.study.findings) and the generated results document
(qdsl.study.report): verdicts from synthetic tables, blocks rewritten, prose kept."""

from __future__ import annotations

import json
import math

import pytest

from qdsl.errors import QdslError
from qdsl.study.findings import (CONTRADICTED, FINDINGS, INCONCLUSIVE, NOT_RUN, REPRODUCED,
                                 evaluate, render)
from qdsl.study.report import SKELETON, update_doc
from qdsl.study.seeds import margins

N = 100


def _row(label, es, em=5.0, ppl=10.0, sd=0.0, seed=0, n=N, **kw):
    """A measured row over ``n`` samples whose ES averages ``es``: sample i scores
    es + sd * z_i (z_i a fixed +-1 pattern shifted by ``seed``, mean 0)."""
    z = [1.0 if (i + seed) % 2 else -1.0 for i in range(n)]
    samples = [{"id": f"s{i}", "es": es + sd * z[i], "em": i < round(em * n / 100)}
               for i in range(n)]
    return {"label": label, "es": es, "em": em, "ppl": ppl, "samples": samples, **kw}


def _verdict(tables, claim_start):
    return next(f for f in evaluate(tables) if f["claim"].startswith(claim_start))


def test_margins_are_data():
    assert margins() == {"es": 2.0, "em": 2.0, "pass1": 5.0, "ppl_pct": 5.0,
                         "robust_drop_pct": 5.0}


@pytest.mark.parametrize("w8a32, sd, expected", [
    (41.5, 1.0, REPRODUCED),      # drop 0.5, CI well inside the 2-point margin
    (40.5, 10.0, INCONCLUSIVE),   # drop 1.5, but the CI reaches past 2 points
    (30.0, 1.0, CONTRADICTED),    # drop 12: the whole CI outside the margin
    (44.0, 1.0, REPRODUCED)])     # a gain is no loss
def test_near_lossless_is_an_equivalence_claim(w8a32, sd, expected):
    t = {"storti-2": [_row("Baseline", 42.0), _row("W8A32", w8a32, sd=sd, seed=1)]}
    f = _verdict(t, "8-bit weights with float")
    assert f["verdict"] == expected, f
    assert "margin -2" in f["evidence"] and "bootstrap [" in f["evidence"]


def test_near_lossless_a_few_points_has_its_own_margin():
    t = {"storti-2": [_row("Baseline", 42.0), _row("W8A8", 39.0, sd=1.0, seed=1)]}
    f = _verdict(t, "naive W8A8")
    assert f["verdict"] == REPRODUCED and "margin -5" in f["evidence"]


def test_near_lossless_needs_perplexity_inside_its_margin_where_recorded():
    base, q = _row("Baseline", 42.0), _row("W8A32", 41.8, sd=0.5, seed=1)
    t = {"storti-2": [base, q]}
    assert "no CI (old cache)" in _verdict(t, "8-bit weights with float")["evidence"]
    base["ppl_window_nll"] = [2.0, 2.1, 1.9, 2.3]
    q["ppl_window_nll"] = [x + math.log(1.3) for x in base["ppl_window_nll"]]
    f = _verdict(t, "8-bit weights with float")
    assert f["verdict"] == CONTRADICTED and "ppl ratio x1.300 [1.300, 1.300]" in f["evidence"]
    q["ppl_window_nll"] = [x + math.log(1.01) for x in base["ppl_window_nll"]]
    assert _verdict(t, "8-bit weights with float")["verdict"] == REPRODUCED


@pytest.mark.parametrize("per_col, expected", [(40.0, REPRODUCED), (30.5, INCONCLUSIVE),
                                               (20.0, CONTRADICTED)])
def test_better_needs_its_ci_above_zero(per_col, expected):
    t = {"wei-4": [_row("Static (per-column)", per_col, sd=5.0, seed=1),
                   _row("Static (per-tensor)", 30.0)]}
    f = _verdict(t, "static per-column")
    assert f["verdict"] == expected and "ΔES" in f["evidence"]


def test_rows_without_per_sample_scores_are_not_decided():
    t = {"wei-4": [{"label": "Static (per-column)", "es": 40.0, "em": 1.0},
                   {"label": "Static (per-tensor)", "es": 30.0, "em": 1.0}]}
    f = _verdict(t, "static per-column")
    assert f["verdict"] == NOT_RUN and "per-sample ES scores" in f["evidence"]


def _he(passed, problems=82):
    return {"problems": problems, "passed": len(passed), "pass@1": len(passed) / problems,
            "results": [{"task_id": f"HumanEval/{i}", "passed": i in passed}
                        for i in range(problems)]}


def test_wei_claims_are_decided_by_pass_at_1_when_every_row_has_it():
    t = {"wei-4": [_row("Static (per-column)", 55.9, n=20, humaneval=_he(set(range(41)))),
                   _row("Static (per-tensor)", 52.4, n=20, humaneval=_he(set(range(21)))),
                   _row("Full precision", 57.2, n=20, humaneval=_he(set(range(49)))),
                   _row("Dynamic (per-tensor)", 51.6, n=20, humaneval=_he(set(range(43))))]}
    f = _verdict(t, "static per-column")   # +24.4 points, 20 discordant pairs of 20
    assert f["verdict"] == REPRODUCED and "Δpass@1 +24.4" in f["evidence"]
    assert "McNemar 20/0" in f["evidence"]
    f = _verdict(t, "dynamic per-tensor")  # -7.3 points: CI past the 5-point margin
    assert f["verdict"] == INCONCLUSIVE and "HumanEval pass@1 52.4% of 82" in f["evidence"]
    t["wei-4"][3]["humaneval"] = _he(set(range(20)))
    assert _verdict(t, "dynamic per-tensor")["verdict"] == CONTRADICTED
    del t["wei-4"][1]["humaneval"]         # one row without HumanEval: ES decides
    assert "ΔES" in _verdict(t, "static per-column")["evidence"]


def test_calibration_size_is_decided_on_three_of_four_rows():
    rows = [_row("32 windows", 41.1, sd=1.0), _row("128 windows", 42.0, sd=1.0, seed=1),
            _row("512 windows", 41.1, sd=1.0)]
    assert _verdict({"wei-fig7": rows[:2]}, "the calibration-set size")["verdict"] == NOT_RUN
    f = _verdict({"wei-fig7": rows}, "the calibration-set size")
    assert f["verdict"] == REPRODUCED and f["evidence"].endswith(
        "margin ±2 (2048 windows not run yet)")
    rows.append(_row("2048 windows", 20.0, sd=1.0))
    assert _verdict({"wei-fig7": rows}, "the calibration-set size")["verdict"] == CONTRADICTED
    rows[-1] = _row("2048 windows", 40.5, sd=8.0, seed=1)
    assert _verdict({"wei-fig7": rows}, "the calibration-set size")["verdict"] == INCONCLUSIVE


def test_calibration_size_needs_perplexity_alike_where_recorded():
    rows = [_row("32 windows", 41.1, sd=1.0), _row("128 windows", 42.0, sd=1.0, seed=1),
            _row("512 windows", 41.1, sd=1.0)]
    base = [2.0, 2.1, 1.9, 2.3]
    for r, f in zip(rows, (1.12, 1.01, 1.0)):
        r["ppl_window_nll"] = [x + math.log(f) for x in base]
    f = _verdict({"wei-fig7": rows}, "the calibration-set size")
    # ES alike, but 32 windows' perplexity is x1.12 that of 512's: wholly past x1.05
    assert f["verdict"] == CONTRADICTED, f
    assert "widest ppl ratio: 32 windows / 512 windows x1.120 [1.120, 1.120]" in f["evidence"]
    rows[0]["ppl_window_nll"] = [x + math.log(1.02) for x in base]
    assert _verdict({"wei-fig7": rows}, "the calibration-set size")["verdict"] == REPRODUCED
    rows[0]["ppl_window_nll"] = [x + math.log(1.02) + e for x, e in
                                 zip(base, (0.1, -0.1, 0.1, -0.1))]
    assert _verdict({"wei-fig7": rows}, "the calibration-set size")["verdict"] == INCONCLUSIVE
    del rows[0]["ppl_window_nll"]      # a pair without losses cannot be called alike
    f = _verdict({"wei-fig7": rows}, "the calibration-set size")
    assert f["verdict"] == INCONCLUSIVE and "2 pair(s) without per-window losses" in f["evidence"]


def test_recovers_share_of_the_loss():
    t = {"storti-3": [_row("Baseline (fp32)", 42.0), _row("Naive W8A8", 2.0, sd=1.0),
                      _row("Residual Sum of block", 30.0, sd=1.0, seed=1)]}
    assert _verdict(t, "keeping the block's residual")["verdict"] == REPRODUCED
    t["storti-3"][2] = _row("Residual Sum of block", 10.0, sd=1.0, seed=1)
    f = _verdict(t, "keeping the block's residual")
    assert f["verdict"] == CONTRADICTED and "won back +8.0" in f["evidence"]
    t["storti-3"][1] = _row("Naive W8A8", 41.0, sd=10.0, seed=1)  # nothing measurable lost
    f = _verdict(t, "keeping the block's residual")
    assert f["verdict"] == INCONCLUSIVE and "not significant" in f["evidence"]


def test_collapses_keeps_less_than_half():
    t = {"wei-5": [_row("Full precision", 42.0), _row("W8A4", 5.0, sd=1.0)]}
    assert _verdict(t, "W8A4 collapses")["verdict"] == REPRODUCED
    t["wei-5"][1] = _row("W8A4", 35.0, sd=1.0)
    assert _verdict(t, "W8A4 collapses")["verdict"] == CONTRADICTED
    t["wei-5"][1] = _row("W8A4", 21.0, sd=20.0)
    assert _verdict(t, "W8A4 collapses")["verdict"] == INCONCLUSIVE


@pytest.mark.parametrize("w4a8, sd, expected", [
    (30.0, 1.0, REPRODUCED),      # keeps 30 of 42 and sits below W8A8's 38
    (10.0, 1.0, CONTRADICTED),    # below W8A8, but keeps less than half: not usable
    (40.0, 1.0, CONTRADICTED),    # usable, but above W8A8
    (21.5, 8.0, INCONCLUSIVE)])   # below W8A8; whether it keeps half, the CI cannot say
def test_usable_below_decides_both_halves(w4a8, sd, expected):
    t = {"wei-5": [_row("Full precision", 42.0), _row("W8A8", 38.0),
                   _row("W4A8", w4a8, sd=sd, seed=1)]}
    f = _verdict(t, "W4A8 stays usable")
    assert f["verdict"] == expected, f
    assert "usable: ES W4A8 - 0.5 x Full precision" in f["evidence"]
    assert "below: ΔES" in f["evidence"]


def test_missing_rows_are_not_run():
    t = {"wei-5": [_row("Full precision", 42.0), {"label": "W8A4", "es": None}]}
    f = _verdict(t, "W8A4 collapses")
    assert f["verdict"] == NOT_RUN and "W8A4" in f["evidence"]
    assert all(f["verdict"] == NOT_RUN for f in evaluate({}))


def _robust(n, drops, es=50.0):
    """A robust result over n samples where sample i loses drops[i] ES points."""
    ps = [{"id": str(i), "es_clean": es, "es": es - d} for i, d in enumerate(drops)]
    pct = 100 * sum(drops) / n / es
    return {"robust": {"n": n, "es": es, "es_drop_pct": pct, "perturbed_samples": ps}}


def test_robustness_follows_weis_result_3():
    """No quantized row may lose more than the margin beyond the float row's %drop."""
    fp = _robust(20, [0.0] * 10)
    same = _robust(20, [1.0, -1.0] * 5)
    noisy = _robust(20, [30.0, -25.0, 20.0, -10.0, 15.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    worse = _robust(20, [20.0] * 10)
    rows = lambda q: {"wei-7": [_row("FP", 50, **fp), _row("D (T)", 50, **same),  # noqa: E731
                                _row("S (C)", 50, **same), _row("S (T)", 50, **q)]}
    f = _verdict(rows(same), "quantization has no negative impact")
    assert f["verdict"] == REPRODUCED and "margin +5 %drop points" in f["evidence"], f
    assert _verdict(rows(noisy), "quantization has no negative")["verdict"] == INCONCLUSIVE
    assert _verdict(rows(worse), "quantization has no negative")["verdict"] == CONTRADICTED
    gain = _robust(20, [-10.0] * 10)      # more robust than float: no negative impact
    assert _verdict(rows(gain), "quantization has no negative")["verdict"] == REPRODUCED


def test_robustness_without_per_sample_scores_is_inconclusive():
    rob = lambda d: {"robust": {"es_drop_pct": d}}  # noqa: E731
    t = {"wei-7": [_row("FP", 40, **rob(2.0)), _row("D (T)", 39, **rob(5.0)),
                   _row("S (C)", 38, **rob(4.0)), _row("S (T)", 30, **rob(9.0))]}
    f = _verdict(t, "quantization has no negative")
    assert f["verdict"] == INCONCLUSIVE and "no per-sample scores: no CI" in f["evidence"]


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
        assert evaluate(full)[FINDINGS.index(f)]["verdict"] != NOT_RUN, f.claim


def test_render_groups_by_paper():
    md = render(evaluate({}), 100)
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


def test_ratio_intervals_print_at_the_precision_their_size_needs():
    from qdsl.study.paired import fmt
    from qdsl.study.stats import Interval

    def iv(est, lo, hi):
        return Interval(est, lo, hi, method="t", n=256)

    assert fmt(iv(1.0764, 1.0675, 1.0856), 3, ratio=True) == "x1.076 [1.067, 1.086]"
    assert fmt(iv(172888.05, 126669.68, 235970.25), 3, ratio=True) == \
        "x172,888 [126,670, 235,970]"
    assert fmt(iv(708.63, 612.1, 820.4), 3, ratio=True) == "x708.6 [612.1, 820.4]"
    # W8A32 / W4A32 on SmolLM2: 30.3 / 145,736; no longer 'x0.000 [0.000, 0.000]'
    assert fmt(iv(2.08e-4, 1.7e-4, 2.5e-4), 3, ratio=True) == \
        "x2.08e-04 [1.70e-04, 2.50e-04]"
    assert fmt(iv(-0.9, -2.3, 0.5)) == "-0.9 [-2.3, +0.5]"
