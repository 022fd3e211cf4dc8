"""qdsl.study.precision: sample sizes from a row's measured paired SD."""

from __future__ import annotations

from qdsl.study.precision import needs, precision_table
from qdsl.study.stats import n_for_halfwidth


def _row(est, sd, n=100, secs=200.0):
    return {"eval_seconds": secs,
            "vs_float": {"es": {"est": est, "lo": est - 1, "hi": est + 1, "n": n, "sd": sd}}}


def test_needs_reads_the_paired_sd():
    x = needs("r", _row(-2.0, 15.0))
    assert (x.n_needed, x.half_width, x.sec_per_sample) == (387, 1.0, 2.0)
    assert needs("fp32", {"es": 40.0}) is None and needs("gone", None) is None
    assert needs("old", {"vs_float": {"ppl": "no CI (old cache)"}}) is None


def test_precision_table_names_the_largest_n_and_its_cost():
    md = precision_table("M", [("near", _row(-1.0, 10.0)), ("broken", _row(-40.0, 30.0)),
                               ("fp32", None)])
    big, small = n_for_halfwidth(30.0, 1.5), n_for_halfwidth(10.0, 1.5)
    assert f"needs n = {big:,}" in md and f"need at most {small:,}" in md
    assert "| near | 10.0 | 100 | 1.0 |" in md and "fp32" not in md
    assert f"2 rows at n = {big:,} take about {2.0 * big * 2 / 3600:.1f} h" in md
    assert "no paired ES intervals" in precision_table("M", [("fp32", None)])


def test_the_completions_own_time_wins_over_the_upper_bound():
    timed = {**_row(-1.0, 10.0), "complete_seconds": 30.0, "complete_n": 60}
    x = needs("r", timed)
    assert (x.sec_per_sample, x.upper_bound) == (0.5, False)
    assert needs("old", _row(-1.0, 10.0)).upper_bound
    big = n_for_halfwidth(30.0, 1.5)
    md = precision_table("M", [("timed", timed), ("old", _row(-40.0, 30.0))])
    assert "(completions only, mean of 1 row)" in md       # the old row's bound left out
    assert f"2 rows at n = {big:,} take about {0.5 * big * 2 / 3600:.1f} h" in md
    assert "single-thread completion" in md
    md = precision_table("M", [("old", _row(-40.0, 30.0))])
    assert "perplexity included: an upper bound" in md and "single-thread evaluation" in md
