"""Paired comparisons of two measured sweep rows (``qdsl.study.stats`` on the rows).

A row is a quality job's result as ``qdsl.study.tables.table_results`` builds it: its
per-sample completion scores (``samples``: id, em, es), its per-window perplexity
losses (``ppl_window_nll``; absent from caches made before they were recorded) and,
for a HumanEval row, its per-problem results (``humaneval.results``: task_id, passed).
Two rows are paired by sample id / window index / task id; rows scored on different
samples (another benchmark seed or size) are not comparable and give None.

Units: ES in edit-similarity points (0-100); EM and pass@1 in percentage points;
perplexity as the ratio of the two rows' perplexities.
"""

from __future__ import annotations

from .stats import Interval, McNemar, mcnemar, mean_t, paired_bootstrap, paired_t, ppl_ratio

OLD_CACHE = "no CI (old cache)"


def _by_id(row: dict, key: str) -> dict | None:
    samples = row.get("samples")
    if not samples:
        return None
    return {s["id"]: s[key] for s in samples}


def aligned(rows: list[dict], metric: str) -> list[list[float]] | None:
    """Per-sample values of ``metric`` for each row, aligned over the samples every row
    scored (the same set, else None): ES points, EM or pass@1 as 0 / 100."""
    if metric == "pass@1":
        maps = []
        for r in rows:
            res = (r.get("humaneval") or {}).get("results")
            if not res:
                return None
            maps.append({x["task_id"]: 100.0 * bool(x["passed"]) for x in res})
    else:
        maps = [_by_id(r, metric) for r in rows]
        if any(m is None for m in maps):
            return None
        maps = [{k: 100.0 * v if metric == "em" else float(v) for k, v in m.items()}
                for m in maps]
    ids = list(maps[0])
    if any(set(m) != set(ids) for m in maps[1:]):
        return None
    return [[m[i] for i in ids] for m in maps]


def es_diff(ra: dict, rb: dict, bootstrap: bool = False) -> Interval | None:
    """ES of ``ra`` minus ``rb``, paired per sample (t interval, or the bootstrap)."""
    v = aligned([ra, rb], "es")
    if v is None:
        return None
    return (paired_bootstrap if bootstrap else paired_t)(v[0], v[1])


def proportion_test(ra: dict, rb: dict, metric: str) -> McNemar | None:
    """McNemar's test and Newcombe's interval for EM or pass@1 (fractions: x100 for
    points), ``ra`` minus ``rb``."""
    v = aligned([ra, rb], metric)
    if v is None:
        return None
    return mcnemar([x > 0 for x in v[0]], [x > 0 for x in v[1]])


def ppl_test(ra: dict, rb: dict) -> Interval | None:
    """Perplexity ratio ``ra`` / ``rb`` from the paired per-window losses; None where a
    row has none (an old cache entry) or the windows differ in number."""
    a, b = ra.get("ppl_window_nll"), rb.get("ppl_window_nll")
    if not a or not b or len(a) != len(b):
        return None
    return ppl_ratio(a, b)


def metric_diff(ra: dict, rb: dict, metric: str) -> Interval | None:
    """``ra`` minus ``rb`` in points of ``metric`` ("es", "em", "pass@1")."""
    if metric == "es":
        return es_diff(ra, rb)
    t = proportion_test(ra, rb, metric)
    if t is None:
        return None
    d = t.diff
    return Interval(100 * d.est, 100 * d.lo, 100 * d.hi, d.n, d.method)


def vs_float(row: dict, base: dict | None) -> dict:
    """The row's paired differences from the float row, JSON: es / em / pass@1 / ppl
    (each an interval, EM and pass@1 with McNemar's counts and p values), or
    ``{"ppl": "no CI (old cache)"}`` where the losses were not recorded."""
    if base is None or row is base:
        return {}
    out: dict = {}
    es = es_diff(row, base)
    if es is not None:
        out["es"] = es.to_json()
        out["es_bootstrap"] = es_diff(row, base, bootstrap=True).to_json()
    for m in ("em", "pass@1"):
        t = proportion_test(row, base, m)
        if t is not None:
            out[m] = {**metric_diff(row, base, m).to_json(), "mcnemar_b": t.b,
                      "mcnemar_c": t.c, "p_exact": t.p_exact, "p_mid": t.p_mid}
    if row.get("ppl") is not None and base.get("ppl") is not None:
        p = ppl_test(row, base)
        out["ppl"] = p.to_json() if p is not None else OLD_CACHE
    return out


def _pct_drop_contrib(r: dict) -> dict | None:
    """Sample id -> its share of the row's ES %drop, 100 x (clean - perturbed) / ES (0
    where the perturbation left the prompt alone); None without per-sample clean ES."""
    ps = r.get("perturbed_samples")
    if ps is None or not r.get("es") or any("es_clean" not in x for x in ps):
        return None
    return {x["id"]: 100.0 * (x["es_clean"] - x["es"]) / r["es"] for x in ps}


def pct_drop_diff(rq: dict, r0: dict) -> Interval | None:
    """%drop of q - %drop of the base, paired over the samples (t interval)."""
    cq, c0 = _pct_drop_contrib(rq), _pct_drop_contrib(r0)
    n = rq.get("n") or 0
    if cq is None or c0 is None or n < 2 or n != r0.get("n"):
        return None
    x = [cq.get(i, 0.0) - c0.get(i, 0.0) for i in set(cq) | set(c0)]
    return mean_t(x + [0.0] * (n - len(x)))


def _ratio_num(v: float, digits: int) -> str:
    """A ratio at ``digits`` decimals, or as many as its size needs: '172,888',
    '708.6', '2.08e-04' (a collapsed row's ratios span eight orders of magnitude)."""
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 100:
        return f"{v:.1f}"
    if 0 < v < 0.01:
        return f"{v:.2e}"
    return f"{v:.{digits}f}"


def fmt(iv: Interval | None, digits: int = 1, ratio: bool = False) -> str:
    """'-0.9 [-2.3, +0.5]', or for a ratio 'x1.17 [1.10, 1.24]' (large and tiny ratios
    by their size: 'x172,888 [126,670, 235,970]', 'x2.08e-04 [...]'); '' for None."""
    if iv is None:
        return ""
    if ratio:
        lo, est, hi = (_ratio_num(v, digits) for v in (iv.lo, iv.est, iv.hi))
        return f"x{est} [{lo}, {hi}]"
    return f"{iv.est:+.{digits}f} [{iv.lo:+.{digits}f}, {iv.hi:+.{digits}f}]"
