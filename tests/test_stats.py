"""qdsl.study.stats: known values (tabulated quantiles, textbook examples, hand
computation) and hypothesis properties of every interval."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings, strategies as st

from qdsl.study import stats

# --------------------------------------------------------------- known values


@pytest.mark.parametrize("df, q", [(1, 12.7062047362), (2, 4.3026527297), (4, 2.7764451052),
                                   (9, 2.2621571628), (19, 2.0930240544),
                                   (99, 1.9842169516), (1000, 1.9623390808)])
def test_t_quantile_matches_tables(df, q):
    assert stats.t_quantile(0.975, df) == pytest.approx(q, abs=1e-8)
    assert stats.t_quantile(0.025, df) == pytest.approx(-q, abs=1e-8)
    assert stats.t_cdf(q, df) == pytest.approx(0.975, abs=1e-10)


def test_paired_t_on_students_sleep_data():
    """Cushny & Peebles' sleep data (Student 1908), R's t.test(paired = TRUE): mean
    difference -1.58, 95% CI [-2.4598858, -0.7001142]."""
    g1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
    g2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]
    iv = stats.paired_t(g1, g2)
    assert iv.est == pytest.approx(-1.58)
    assert (iv.lo, iv.hi) == (pytest.approx(-2.4598858, abs=1e-6),
                              pytest.approx(-0.7001142, abs=1e-6))
    assert iv.n == 10 and iv.method == "t"


def test_paired_t_by_hand():
    # d = [1, 0, 1, -1, 1.5]: mean 0.5, sd 1, half-width t_{.975,4} / sqrt(5)
    iv = stats.paired_t([1, 2, 3, 4, 5.5], [0, 2, 2, 5, 4])
    h = 2.7764451052 / math.sqrt(5)
    assert (iv.est, iv.sd) == (pytest.approx(0.5), pytest.approx(1.0))
    assert (iv.lo, iv.hi) == (pytest.approx(0.5 - h), pytest.approx(0.5 + h))


def test_mcnemar_exact_and_mid_p_by_hand():
    # b = 3, c = 10: 2 * P(X <= 3 | 13, 1/2) = 2 * 378 / 8192; mid-p less P(X = 3) = 286 / 8192
    exact, mid = stats.mcnemar_p(3, 10)
    assert exact == pytest.approx(756 / 8192) and mid == pytest.approx(470 / 8192)
    assert stats.mcnemar_p(5, 5) == (1.0, 1.0) and stats.mcnemar_p(0, 0) == (1.0, 1.0)
    assert stats.mcnemar_p(0, 6)[0] == pytest.approx(2 / 64)


def test_wilson_matches_newcombe_1998():
    """Newcombe (1998, Stat. Med. 17:857) Table II: 81/263 and 15/148."""
    assert stats.wilson(81, 263) == (pytest.approx(0.2553, abs=5e-5),
                                     pytest.approx(0.3662, abs=5e-5))
    assert stats.wilson(15, 148) == (pytest.approx(0.0624, abs=5e-5),
                                     pytest.approx(0.1605, abs=5e-5))


def test_newcombe_paired_by_hand():
    """Table e=10, f=15, g=5, h=20 (n=50): e*h - f*g = 125 > n/2, so phi = 100 /
    sqrt(25 * 25 * 15 * 35); the limits combine the two Wilson intervals."""
    a = [True] * 25 + [False] * 25              # first outcome: e + f successes
    b = [True] * 10 + [False] * 15 + [True] * 5 + [False] * 20
    iv = stats.newcombe_paired(a, b)
    l1, u1 = stats.wilson(25, 50)
    l2, u2 = stats.wilson(15, 50)
    phi = 100 / math.sqrt(25 * 25 * 15 * 35)
    d = 0.5 - 0.3
    lo = d - math.sqrt((0.5 - l1) ** 2 - 2 * phi * (0.5 - l1) * (u2 - 0.3) + (u2 - 0.3) ** 2)
    hi = d + math.sqrt((u1 - 0.5) ** 2 - 2 * phi * (u1 - 0.5) * (0.3 - l2) + (0.3 - l2) ** 2)
    assert (iv.est, iv.lo, iv.hi) == (pytest.approx(d), pytest.approx(lo), pytest.approx(hi))
    assert 0 < iv.lo < d < iv.hi < 0.4


def test_mcnemar_counts_discordant_pairs():
    a = [True, True, False, False, True]
    b = [True, False, True, False, False]
    t = stats.mcnemar(a, b)
    assert (t.n, t.b, t.c) == (5, 2, 1) and t.diff.est == pytest.approx(0.2)


def test_ppl_ratio_of_a_constant_shift():
    base = [2.0, 2.5, 3.1, 1.7]
    iv = stats.ppl_ratio([x + math.log(1.1) for x in base], base)
    assert (iv.est, iv.lo, iv.hi) == (pytest.approx(1.1), pytest.approx(1.1), pytest.approx(1.1))


def test_time_ratio_is_the_geometric_mean_of_paired_ratios():
    a, b = [10.0, 11.0, 9.5, 10.2], [12.0, 12.5, 11.0, 13.0]
    iv = stats.time_ratio(a, b)
    logs = stats.mean_t([math.log(x / y) for x, y in zip(a, b)])
    assert iv.est == pytest.approx(math.exp(logs.est))
    assert (iv.lo, iv.hi) == (pytest.approx(math.exp(logs.lo)), pytest.approx(math.exp(logs.hi)))
    assert iv.lo < iv.est < iv.hi < 1
    same = stats.time_ratio([2 * x for x in a], a)            # a constant factor
    assert (same.est, same.lo, same.hi) == (pytest.approx(2), pytest.approx(2), pytest.approx(2))


def test_n_for_halfwidth():
    # normal answer (1.96 * 15 / 1.5)^2 = 384.1; the t interval needs 387
    assert stats.n_for_halfwidth(15.0, 1.5) == 387
    for sd, h in ((15.0, 1.5), (30.0, 1.5), (4.0, 2.0)):
        n = stats.n_for_halfwidth(sd, h)
        assert stats.t_quantile(0.975, n - 1) * sd / math.sqrt(n) <= h
        assert stats.t_quantile(0.975, n - 2) * sd / math.sqrt(n - 1) > h
    assert stats.n_for_halfwidth(0.0, 1.0) == 2
    with pytest.raises(ValueError, match="half_width"):
        stats.n_for_halfwidth(1.0, 0.0)


def test_bootstrap_is_seeded_and_close_to_t_on_many_samples():
    import random
    rng = random.Random(1)
    a = [rng.gauss(0, 10) for _ in range(400)]
    b = [x + rng.gauss(1, 5) for x in a]
    one, two = stats.paired_bootstrap(a, b), stats.paired_bootstrap(a, b)
    assert one == two and one.method == "percentile bootstrap"
    t = stats.paired_t(a, b)
    assert one.lo == pytest.approx(t.lo, abs=0.15) and one.hi == pytest.approx(t.hi, abs=0.15)


def test_errors():
    with pytest.raises(ValueError, match="different lengths"):
        stats.paired_t([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="no paired samples"):
        stats.paired_t([], [])
    with pytest.raises(ValueError, match="t_quantile"):
        stats.t_quantile(1.0, 3)


# --------------------------------------------------------------- properties

_x = st.floats(-100, 100, allow_nan=False, allow_infinity=False)
_pairs = st.integers(2, 40).flatmap(
    lambda n: st.tuples(st.lists(_x, min_size=n, max_size=n), st.lists(_x, min_size=n, max_size=n)))
_bools = st.integers(1, 60).flatmap(
    lambda n: st.tuples(st.lists(st.booleans(), min_size=n, max_size=n),
                        st.lists(st.booleans(), min_size=n, max_size=n)))


def _contains(iv):
    return iv.lo - 1e-9 <= iv.est <= iv.hi + 1e-9


@settings(max_examples=60, deadline=None)
@given(_pairs)
def test_t_interval_contains_its_estimate_and_swapping_negates(ab):
    a, b = ab
    iv, vi = stats.paired_t(a, b), stats.paired_t(b, a)
    assert _contains(iv)
    assert vi.est == pytest.approx(-iv.est, abs=1e-9)
    assert (vi.lo, vi.hi) == (pytest.approx(-iv.hi, abs=1e-6), pytest.approx(-iv.lo, abs=1e-6))


@settings(max_examples=25, deadline=None)
@given(_pairs)
def test_bootstrap_contains_its_estimate_and_swapping_negates(ab):
    a, b = ab
    iv = stats.paired_bootstrap(a, b, resamples=200)
    vi = stats.paired_bootstrap(b, a, resamples=200)
    assert _contains(iv)
    assert (vi.lo, vi.hi) == (pytest.approx(-iv.hi, abs=1e-6), pytest.approx(-iv.lo, abs=1e-6))


@settings(max_examples=80, deadline=None)
@given(_bools)
def test_newcombe_and_mcnemar_are_symmetric(ab):
    a, b = ab
    iv, vi = stats.newcombe_paired(a, b), stats.newcombe_paired(b, a)
    assert _contains(iv) and -1.0 <= iv.lo <= iv.hi <= 1.0
    assert (vi.est, vi.lo, vi.hi) == (pytest.approx(-iv.est), pytest.approx(-iv.hi),
                                      pytest.approx(-iv.lo))
    t, u = stats.mcnemar(a, b), stats.mcnemar(b, a)
    assert (t.b, t.c) == (u.c, u.b) and (t.p_exact, t.p_mid) == (u.p_exact, u.p_mid)
    assert 0.0 <= t.p_mid <= t.p_exact <= 1.0


@settings(max_examples=40, deadline=None)
@given(_pairs)
def test_ppl_ratio_contains_its_estimate_and_inverts(ab):
    a, b = ([x / 20 for x in v] for v in ab)   # NLLs of a few nats
    iv, vi = stats.ppl_ratio(a, b), stats.ppl_ratio(b, a)
    assert _contains(iv) and iv.lo > 0
    assert vi.est == pytest.approx(1 / iv.est) and vi.lo == pytest.approx(1 / iv.hi)


@settings(max_examples=40, deadline=None)
@given(st.floats(0.01, 0.99), st.floats(1, 500))
def test_t_quantile_inverts_the_cdf(p, df):
    assert stats.t_cdf(stats.t_quantile(p, df), df) == pytest.approx(p, abs=1e-9)
