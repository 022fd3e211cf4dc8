"""Paired statistics for the study's tables and verdicts: one module, used by all.

Every row of a sweep scores the same samples (completion prompts, perplexity
windows, HumanEval problems) as its float row, so a row's difference from the float
row is estimated from the per-sample differences, never from two independent means.

* ``paired_t``: the mean of paired differences with a Student t interval
  (``mean +- t_{1-a/2, n-1} * sd / sqrt(n)``). The tables and the verdicts use it.
* ``paired_bootstrap``: the same mean with a seeded **percentile** bootstrap interval
  (``BOOTSTRAP_RESAMPLES`` resamples of the samples with replacement, ``random.Random``
  seeded, so a report is reproducible); the findings print it beside the t interval
  as a check that the t interval's normality assumption does not decide a verdict.
* ``mcnemar``: two paired proportions (EM, pass@1): McNemar's **exact** two-sided
  binomial test on the discordant pairs (and the mid-p value), with Newcombe's
  (1998, method 10) hybrid-score interval for the difference of the proportions.
* ``ppl_ratio``: perplexity of a row over the float row's, from the per-window mean
  negative log-likelihoods: ``exp`` of the mean paired difference (the geometric mean
  of the per-window perplexity ratios), with ``exp`` of its t interval.
* ``n_for_halfwidth``: the samples a paired t interval needs for a target half-width,
  given a measured SD of the paired differences.

Pure Python (``math``, ``random``, ``statistics``): the study's modules are imported
on the sweep command's light path. The t quantile is computed here (a regularized
incomplete beta function inverted by bisection), checked in the tests against
tabulated values.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from statistics import NormalDist

LEVEL = 0.95                  # every interval of the study is a 95% interval
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval; ``n`` paired samples, ``sd`` the
    standard deviation of the paired differences (None where it does not apply)."""
    est: float
    lo: float
    hi: float
    n: int
    method: str
    sd: float | None = None

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    def excludes(self, value: float) -> bool:
        return self.lo > value or self.hi < value

    def to_json(self) -> dict:
        return {"est": self.est, "lo": self.lo, "hi": self.hi, "n": self.n,
                "method": self.method, **({"sd": self.sd} if self.sd is not None else {})}


# ------------------------------------------------------------------ distributions


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
           + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (bisection on ``t_cdf``, to 1e-12)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile: p must lie in (0, 1) and df > 0 (p={p}, df={df})")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return (lo + hi) / 2


# ------------------------------------------------------------------ paired means


def _diffs(a: list[float], b: list[float]) -> list[float]:
    if len(a) != len(b):
        raise ValueError(f"paired samples of different lengths ({len(a)} vs {len(b)})")
    if not a:
        raise ValueError("no paired samples")
    return [x - y for x, y in zip(a, b)]


def mean_sd(x: list[float]) -> tuple[float, float]:
    """Mean and sample SD (n - 1; 0.0 for a single value)."""
    n = len(x)
    m = math.fsum(x) / n
    if n < 2:
        return m, 0.0
    return m, math.sqrt(math.fsum((v - m) ** 2 for v in x) / (n - 1))


def mean_t(x: list[float], level: float = LEVEL) -> Interval:
    """The mean of ``x`` with its Student t interval (a point interval for n = 1)."""
    n = len(x)
    if n == 0:
        raise ValueError("no samples")
    m, sd = mean_sd(x)
    if n < 2:
        return Interval(m, m, m, n, "t", sd)
    h = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    # the mean lies in its own interval also where rounding of a constant sample would
    # put a tiny half-width on the wrong side of it
    return Interval(m, min(m, m - h), max(m, m + h), n, "t", sd)


def paired_t(a: list[float], b: list[float], level: float = LEVEL) -> Interval:
    """mean(a - b) over paired samples with its t interval."""
    return mean_t(_diffs(a, b), level)


def paired_bootstrap(a: list[float], b: list[float], level: float = LEVEL,
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> Interval:
    """mean(a - b) with a seeded percentile bootstrap interval (resampling pairs)."""
    d = _diffs(a, b)
    n = len(d)
    m, sd = mean_sd(d)
    rng = random.Random(seed)
    means = sorted(math.fsum(rng.choices(d, k=n)) / n for _ in range(resamples))
    alpha = (1 - level) / 2
    lo = means[max(0, math.floor(alpha * resamples))]
    hi = means[min(resamples - 1, math.ceil((1 - alpha) * resamples) - 1)]
    return Interval(m, min(lo, m), max(hi, m), n, "percentile bootstrap", sd)


# ------------------------------------------------------------------ paired proportions


@dataclass(frozen=True)
class McNemar:
    """Two paired binary outcomes: ``b`` pairs where only the first succeeds, ``c``
    where only the second does; ``diff`` = (b - c) / n (first minus second) with
    Newcombe's interval; ``p_exact`` / ``p_mid``: McNemar's exact binomial test."""
    n: int
    b: int
    c: int
    p_exact: float
    p_mid: float
    diff: Interval

    def to_json(self) -> dict:
        return {"n": self.n, "b": self.b, "c": self.c, "p_exact": self.p_exact,
                "p_mid": self.p_mid, "diff": self.diff.to_json()}


def _binom_cdf(k: int, n: int) -> float:
    """P(X <= k), X ~ Binomial(n, 1/2)."""
    return math.fsum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n


def mcnemar_p(b: int, c: int) -> tuple[float, float]:
    """(exact two-sided p, mid-p) of McNemar's test on ``b`` and ``c`` discordant pairs:
    2 P(X <= min(b, c)) with X ~ Binomial(b + c, 1/2), capped at 1; the mid-p subtracts
    P(X = min(b, c)). (1.0, 1.0) without discordant pairs."""
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0, 1.0
    exact = min(1.0, 2 * _binom_cdf(k, n))
    # mid-p: 2 P(X < k) + P(X = k), which is 1 when b == c
    mid = 1.0 if b == c else 2 * _binom_cdf(k, n) - math.comb(n, k) / 2.0 ** n
    return exact, mid


def wilson(x: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of the proportion x / n."""
    if n == 0:
        raise ValueError("wilson: n = 0")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = x / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - h), min(1.0, centre + h)


def newcombe_paired(a: list[bool], b: list[bool], level: float = LEVEL) -> Interval:
    """p_a - p_b over paired binary outcomes, with Newcombe's (1998, Stat. Med. 17:2635)
    method 10 interval: the two Wilson score intervals combined with the continuity-
    corrected correlation phi of the paired 2x2 table."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired outcomes: lengths {len(a)} and {len(b)}")
    n = len(a)
    e = sum(1 for x, y in zip(a, b) if x and y)
    f = sum(1 for x, y in zip(a, b) if x and not y)
    g = sum(1 for x, y in zip(a, b) if y and not x)
    h = n - e - f - g
    p1, p2 = (e + f) / n, (e + g) / n
    l1, u1 = wilson(e + f, n, level)
    l2, u2 = wilson(e + g, n, level)
    den = (e + f) * (g + h) * (e + g) * (f + h)
    # phi: the 2x2 table's correlation, its numerator e*h - f*g continuity-corrected as
    # Newcombe's method 10 does (less n/2 when above n/2, 0 between 0 and n/2, kept
    # when negative); 0 when a margin is empty
    num = e * h - f * g
    num = num - n / 2 if num > n / 2 else num if num < 0 else 0.0
    phi = num / math.sqrt(den) if den else 0.0
    d = p1 - p2
    dl = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    du = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return Interval(d, max(-1.0, d - dl), min(1.0, d + du), n, "Newcombe paired score")


def mcnemar(a: list[bool], b: list[bool], level: float = LEVEL) -> McNemar:
    """McNemar's exact test and Newcombe's interval for paired outcomes ``a`` vs ``b``."""
    diff = newcombe_paired(a, b, level)
    nb = sum(1 for x, y in zip(a, b) if x and not y)
    nc = sum(1 for x, y in zip(a, b) if y and not x)
    exact, mid = mcnemar_p(nb, nc)
    return McNemar(len(a), nb, nc, exact, mid, diff)


# ------------------------------------------------------------------ perplexity


def ppl_ratio(nll_a: list[float], nll_b: list[float], level: float = LEVEL) -> Interval:
    """Perplexity ratio a / b from paired per-window mean NLLs (nats per token):
    exp(mean(nll_a - nll_b)) with exp of its t interval; ``sd`` stays in nats."""
    iv = paired_t(nll_a, nll_b, level)
    return Interval(math.exp(iv.est), math.exp(iv.lo), math.exp(iv.hi), iv.n,
                    "t on paired log-loss", iv.sd)


def time_ratio(a: list[float], b: list[float], level: float = LEVEL) -> Interval:
    """Ratio a / b of paired positive measurements (times of two variants run in
    alternation): the geometric mean of the per-pair ratios with exp of the t interval
    on their logs; ``sd`` stays on the log scale."""
    iv = paired_t([math.log(x) for x in a], [math.log(x) for x in b], level)
    return Interval(math.exp(iv.est), math.exp(iv.lo), math.exp(iv.hi), iv.n,
                    "t on paired log-ratios", iv.sd)


# ------------------------------------------------------------------ sample size


def n_for_halfwidth(sd: float, half_width: float, level: float = LEVEL) -> int:
    """The least n >= 2 whose paired t interval, at a paired SD ``sd``, has a half-width
    of at most ``half_width``: t_{1-a/2, n-1} * sd / sqrt(n) <= half_width."""
    if half_width <= 0 or sd < 0:
        raise ValueError(f"n_for_halfwidth: need half_width > 0 and sd >= 0 "
                         f"(got {half_width}, {sd})")
    if sd == 0:
        return 2
    z = NormalDist().inv_cdf(0.5 + level / 2)
    n = max(2, math.ceil((z * sd / half_width) ** 2))   # the normal answer: a lower bound
    while t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n) > half_width:
        n += 1
    return n
