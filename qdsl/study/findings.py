"""The seed papers' findings as checks over a sweep's measured rows, with CIs.

Each ``Finding`` states one claim of a seed paper (Storti 2023, Wei et al. 2023) and
a check that reads the measured rows of the sweep's tables and returns a verdict with
the numbers behind it. ``qdsl sweep`` writes them to ``DIR/findings.md``, into
``results.json`` and into the results document (``--doc``), so which findings
reproduced is computed from what was measured, never typed in. The claims themselves
(which check, on which rows) are data: ``[[finding]]`` entries of the seed files
(``qdsl.study.seeds``); the margins are ``qdsl/study/data/margins.toml``.

Every verdict comes from a paired 95% confidence interval (``qdsl.study.stats`` via
``qdsl.study.paired``; every row scores the same samples):

* ``reproduced``: the whole CI lies on the claim's side (for an equivalence claim,
  "near lossless" / "flat", inside the margin);
* ``contradicted``: the whole CI lies on the other side (outside the margin);
* ``inconclusive``: the CI straddles the boundary: this sample cannot decide;
* ``not run yet``: a row the check needs has no result (or no per-sample scores).

The metric: HumanEval pass@1 (Wei et al.'s) when every row of the check has a
per-problem HumanEval result over the same problems, else ES, unless the claim names
one (``metric = "em"``). A "near lossless" or "flat" claim also needs perplexity
inside its margin where the rows recorded per-window losses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

from .paired import (OLD_CACHE, aligned, fmt, metric_diff, pct_drop_diff, ppl_test,
                     proportion_test)
from .seeds import finding_specs, margins
from .stats import BOOTSTRAP_RESAMPLES, Interval, mean_t, paired_bootstrap

REPRODUCED, CONTRADICTED, INCONCLUSIVE, NOT_RUN = ("reproduced", "contradicted",
                                                  "inconclusive", "not run yet")
VERDICTS = (REPRODUCED, CONTRADICTED, INCONCLUSIVE, NOT_RUN)
_MARGIN_KEY = {"es": "es", "em": "em", "pass@1": "pass1"}
_NAME = {"es": "ES", "em": "EM", "pass@1": "pass@1"}


class _Missing(Exception):
    pass


class Rows:
    """The measured rows of a sweep's tables, by (table, label)."""

    def __init__(self, tables: dict[str, list[dict]]):
        self.tables = tables

    def get(self, table: str, label: str) -> dict:
        for row in self.tables.get(table, []):
            if row["label"] == label:
                if row.get("es") is None or row.get("em") is None:   # null: not measured
                    raise _Missing(f"{table}: {label}")
                return row
        raise _Missing(f"{table}: {label}")


def _row_text(label: str, r: dict) -> str:
    ppl = r.get("ppl")
    ppl_s = "-" if ppl is None else f"{ppl:,.1f}" if ppl < 1e5 else f"{ppl:.2g}"
    he = r.get("humaneval")
    he_s = f", HumanEval pass@1 {100 * he['pass@1']:.1f}% of {he['problems']}" if he else ""
    return f"{label}: ES {r['es']:.1f}, EM {r['em']:.0f}, ppl {ppl_s}{he_s}"


def _metric(rows: list[dict], metric: str | None) -> str:
    """The claim's metric, else pass@1 where every row has per-problem results, else ES."""
    if metric:
        return metric
    return "pass@1" if aligned(rows, "pass@1") is not None else "es"


def _margin(metric: str, margin: float | None) -> float:
    return margin if margin is not None else margins()[_MARGIN_KEY[metric]]


def _values(rows: list[dict], labels: list[str], metric: str) -> list[list[float]]:
    v = aligned(rows, metric)
    if v is None:
        raise _Missing(f"per-sample {_NAME[metric]} scores of {', '.join(labels)}")
    return v


def _diff(ra: dict, rb: dict, a: str, b: str, metric: str) -> Interval:
    d = metric_diff(ra, rb, metric)
    if d is None:
        raise _Missing(f"per-sample {_NAME[metric]} scores of {a}, {b}")
    return d


def _diff_text(ra: dict, rb: dict, metric: str, d: Interval) -> str:
    """'ΔES -16.0 [-19.5, -12.5] (bootstrap [-19.3, -12.6])' or, for a proportion,
    'Δpass@1 -7.3 [-15.9, +1.2] (McNemar 4/10, exact p 0.18)'."""
    text = f"Δ{_NAME[metric]} {fmt(d)}"
    if metric == "es":
        return text + f" (bootstrap {fmt(_boot(ra, rb)).split(' ', 1)[1]})"
    t = proportion_test(ra, rb, metric)
    return text + f" (McNemar {t.b}/{t.c}, exact p {t.p_exact:.2g})"


def _boot(ra: dict, rb: dict) -> Interval:
    v = aligned([ra, rb], "es")
    return paired_bootstrap(v[0], v[1])


def _ppl_text(ra: dict, rb: dict) -> str:
    if ra.get("ppl") is None or rb.get("ppl") is None:
        return ""
    p = ppl_test(ra, rb)
    return f"; ppl ratio {fmt(p, 3, ratio=True)}" if p else f"; ppl ratio: {OLD_CACHE}"


def _side(iv: Interval, boundary: float) -> str:
    """REPRODUCED above ``boundary``, CONTRADICTED below, INCONCLUSIVE across."""
    return REPRODUCED if iv.lo > boundary else CONTRADICTED if iv.hi < boundary else INCONCLUSIVE


def _all_of(verdicts: list[str]) -> str:
    """A claim made of parts: contradicted when one part is, reproduced when all are."""
    return (CONTRADICTED if CONTRADICTED in verdicts else
            REPRODUCED if all(v == REPRODUCED for v in verdicts) else INCONCLUSIVE)


def _kept(x: list[float], base: list[float], share: float) -> Interval:
    """The per-sample contrast x - share x base (its CI above 0: x keeps more than
    ``share`` of the base row's score)."""
    return mean_t([p - share * q for p, q in zip(x, base)])


def _better(a: str, b: str, *, rows: Rows, table: str, metric: str | None = None,
            margin: float | None = None) -> tuple[str, str]:
    """Claim: row ``a`` scores higher than row ``b``: the CI of a - b above 0."""
    ra, rb = rows.get(table, a), rows.get(table, b)
    m = _metric([ra, rb], metric)
    d = _diff(ra, rb, a, b, m)
    return _side(d, 0.0), (f"{_row_text(a, ra)}; {_row_text(b, rb)}; "
                           f"{_diff_text(ra, rb, m, d)}{_ppl_text(ra, rb)}")


def _near(a: str, base: str, *, rows: Rows, table: str, metric: str | None = None,
          margin: float | None = None) -> tuple[str, str]:
    """Claim: row ``a`` loses at most the margin against ``base`` (an equivalence claim,
    one-sided: a gain is no loss). Reproduced when the whole CI of the drop lies inside
    the margin, and perplexity's ratio CI (where recorded) inside its margin;
    contradicted when either CI lies wholly outside."""
    ra, rb = rows.get(table, a), rows.get(table, base)
    m = _metric([ra, rb], metric)
    d, mg = _diff(ra, rb, a, base, m), _margin(m, margin)
    verdicts = [REPRODUCED if d.lo >= -mg else CONTRADICTED if d.hi < -mg else INCONCLUSIVE]
    text = (f"{_row_text(a, ra)}; {_row_text(base, rb)}; {_diff_text(ra, rb, m, d)}, "
            f"margin -{mg:g}{_ppl_text(ra, rb)}")
    p = ppl_test(ra, rb) if ra.get("ppl") is not None and rb.get("ppl") is not None else None
    if p is not None:
        pm = 1 + margins()["ppl_pct"] / 100
        verdicts.append(REPRODUCED if p.hi <= pm else CONTRADICTED if p.lo > pm
                        else INCONCLUSIVE)
        text += f", margin x{pm:g}"
    verdict = _all_of(verdicts)
    return verdict, text


def _recovers(fixed: str, broken: str, base: str, share: float = 0.5, *, rows: Rows,
              table: str, metric: str | None = None,
              margin: float | None = None) -> tuple[str, str]:
    """Claim: ``fixed`` wins back at least ``share`` of what ``broken`` lost vs ``base``:
    the CI of the per-sample contrast (fixed - broken) - share x (base - broken) above
    0; inconclusive when the loss itself is not significant."""
    labels = [fixed, broken, base]
    rs = [rows.get(table, x) for x in labels]
    m = _metric(rs, metric)
    f, b, o = _values(rs, labels, m)
    lost = mean_t([y - x for x, y in zip(b, o)])
    won = mean_t([x - y for x, y in zip(f, b)])
    c = mean_t([(x - y) - share * (z - y) for x, y, z in zip(f, b, o)])
    text = ("; ".join(_row_text(x, r) for x, r in zip(labels, rs))
            + f"; lost {fmt(lost)}, won back {fmt(won)} {_NAME[m]} points; "
            f"won - {share:g} x lost {fmt(c)}")
    if lost.lo <= 0:
        return INCONCLUSIVE, text + " (the loss itself is not significant)"
    return _side(c, 0.0), text


def _collapses(a: str, base: str, *, rows: Rows, table: str, metric: str | None = None,
               margin: float | None = None) -> tuple[str, str]:
    """Claim: row ``a`` keeps less than half of the baseline's score: the CI of the
    per-sample contrast a - 0.5 x base below 0."""
    ra, r0 = rows.get(table, a), rows.get(table, base)
    m = _metric([ra, r0], metric)
    x, o = _values([ra, r0], [a, base], m)
    c = _kept(x, o, 0.5)
    v = _side(c, 0.0)
    verdict = {REPRODUCED: CONTRADICTED, CONTRADICTED: REPRODUCED}.get(v, v)
    return verdict, (f"{_row_text(a, ra)}; {_row_text(base, r0)}; {_NAME[m]} "
                     f"{a} - 0.5 x {base}: {fmt(c)}")


def _usable_below(above: str, a: str, base: str, share: float = 0.5, *, rows: Rows,
                  table: str, metric: str | None = None,
                  margin: float | None = None) -> tuple[str, str]:
    """Claim: row ``a`` stays usable, keeping at least ``share`` of ``base``'s score
    (the CI of the per-sample contrast a - share x base above 0: the opposite of
    ``collapses``), but scores below ``above`` (the CI of above - a above 0).
    Reproduced when both CIs say so, contradicted when either says the opposite."""
    labels = [above, a, base]
    rs = [rows.get(table, x) for x in labels]
    m = _metric(rs, metric)
    d = _diff(rs[0], rs[1], above, a, m)
    x, o = _values(rs[1:], labels[1:], m)
    kept = _kept(x, o, share)
    verdicts = [_side(kept, 0.0), _side(d, 0.0)]
    verdict = _all_of(verdicts)
    return verdict, ("; ".join(_row_text(k, r) for k, r in zip(labels, rs))
                     + f"; usable: {_NAME[m]} {a} - {share:g} x {base}: {fmt(kept)}; below: "
                     f"{_diff_text(rs[0], rs[1], m, d)}{_ppl_text(rs[0], rs[1])}")


def _best_of(a: str, others: list[str], *, rows: Rows, table: str, metric: str | None = None,
             margin: float | None = None) -> tuple[str, str]:
    """Claim: row ``a`` beats every other row: each CI of a - other above 0 (no
    multiple-comparison correction); contradicted when some other row is
    significantly better."""
    ra = rows.get(table, a)
    rest = {o: rows.get(table, o) for o in others if o != a}
    m = _metric([ra, *rest.values()], metric)
    diffs = {o: _diff(ra, r, a, o, m) for o, r in rest.items()}
    sides = {o: _side(d, 0.0) for o, d in diffs.items()}
    worse = [o for o, s in sides.items() if s == CONTRADICTED]
    verdict = (CONTRADICTED if worse else REPRODUCED
               if all(s == REPRODUCED for s in sides.values()) else INCONCLUSIVE)
    top = max(rest, key=lambda o: rest[o]["es"])
    return verdict, (f"{_row_text(a, ra)}; best other by ES: {_row_text(top, rest[top])}; "
                     f"Δ{_NAME[m]} vs it {fmt(diffs[top])}; significantly above "
                     f"{sum(s == REPRODUCED for s in sides.values())} of {len(rest)}, below "
                     f"{len(worse)}" + (f" ({', '.join(worse)})" if worse else ""))


def _flat(labels: list[str], min_rows: int = 3, *, rows: Rows, table: str,
          metric: str | None = None, margin: float | None = None) -> tuple[str, str]:
    """Claim: the rows score alike: every pairwise CI inside the margin (reproduced),
    one wholly outside it (contradicted); decided once ``min_rows`` have run. Like
    ``_near``, an equivalence claim also needs perplexity alike where the rows recorded
    per-window losses (``_flat_ppl``)."""
    got, missing = {}, []
    for x in labels:
        try:
            got[x] = rows.get(table, x)
        except _Missing:
            missing.append(x)
    if len(got) < min_rows:
        raise _Missing(f"{table}: {missing[0]}")
    m = _metric(list(got.values()), metric)
    mg = _margin(m, margin)
    names = list(got)
    pairs = {(x, y): _diff(got[x], got[y], x, y, m)
             for i, x in enumerate(names) for y in names[i + 1:]}
    out = [p for p, d in pairs.items() if d.lo > mg or d.hi < -mg]
    inside = all(-mg <= d.lo and d.hi <= mg for d in pairs.values())
    (x, y), d = max(pairs.items(), key=lambda kv: max(abs(kv[1].lo), abs(kv[1].hi)))
    spread = max(r["es"] for r in got.values()) - min(r["es"] for r in got.values())
    verdicts = [CONTRADICTED if out else REPRODUCED if inside else INCONCLUSIVE]
    text = ("; ".join(_row_text(k, r) for k, r in got.items())
            + f"; ES spread {spread:.1f}; widest pairwise CI: {x} - {y} {fmt(d)}, "
            f"margin ±{mg:g}")
    ppl = _flat_ppl(got)
    if ppl is not None:
        verdicts.append(ppl[0])
        text += ppl[1]
    return _all_of(verdicts), text + (f" ({', '.join(missing)} not run yet)"
                                      if missing else "")


def _flat_ppl(got: dict[str, dict]) -> tuple[str, str] | None:
    """The perplexity half of ``_flat``: every pairwise ratio CI inside [1 / m, m] (m the
    perplexity margin) reproduces, one wholly outside contradicts; a pair without
    per-window losses (an old cache entry) leaves it at most inconclusive. None where
    no pair has them."""
    names = list(got)
    pairs = {(x, y): ppl_test(got[x], got[y])
             for i, x in enumerate(names) for y in names[i + 1:]}
    known = {p: r for p, r in pairs.items() if r is not None}
    if not known:
        return None
    pm = 1 + margins()["ppl_pct"] / 100
    out = any(r.lo > pm or r.hi < 1 / pm for r in known.values())
    inside = len(known) == len(pairs) and all(1 / pm <= r.lo and r.hi <= pm
                                              for r in known.values())
    (x, y), r = max(known.items(), key=lambda kv: max(abs(math.log(kv[1].lo)),
                                                      abs(math.log(kv[1].hi))))
    return (CONTRADICTED if out else REPRODUCED if inside else INCONCLUSIVE,
            f"; widest ppl ratio: {x} / {y} {fmt(r, 3, ratio=True)}, margin x{pm:g}"
            + ("" if len(known) == len(pairs) else
               f" ({len(pairs) - len(known)} pair(s) without per-window losses)"))


def _robust_as_float(quantized: list[str], base: str, *, rows: Rows, table: str,
                     metric: str | None = None,
                     margin: float | None = None) -> tuple[str, str]:
    """Claim (Wei et al. Result 3): quantization has no negative impact on robustness.
    Each quantized row's ES %drop under perturbation minus the float row's, paired per
    sample: reproduced when every CI lies below the margin (no row loses more than
    the margin), contradicted when some row's whole CI lies above it."""
    mg = margin if margin is not None else margins()["robust_drop_pct"]

    def robust(label):
        r = rows.get(table, label).get("robust")
        if not r:
            raise _Missing(f"{table}: {label} (perturbed run)")
        if r.get("es_drop_pct") is None:   # a clean ES of 0: no %drop to compare
            raise _Missing(f"{table}: {label} (an ES %drop; its clean ES is 0)")
        return r
    r0 = robust(base)
    verdicts, parts = [], []
    for q in quantized:
        rq = robust(q)
        d = pct_drop_diff(rq, r0)
        if d is None:
            verdicts.append(INCONCLUSIVE)
            parts.append(f"{q}: {rq['es_drop_pct']:.1f}% (no per-sample scores: no CI)")
            continue
        verdicts.append(REPRODUCED if d.hi <= mg else CONTRADICTED if d.lo > mg
                        else INCONCLUSIVE)
        parts.append(f"{q}: {rq['es_drop_pct']:.1f}% (vs {base} {fmt(d)})")
    verdict = _all_of(verdicts)
    return verdict, (f"{base}: ES drop {r0['es_drop_pct']:.1f}%; " + "; ".join(parts)
                     + f"; margin +{mg:g} %drop points")


@dataclass(frozen=True)
class Finding:
    paper: str
    claim: str
    table: str
    check: Callable[..., tuple[str, str]]   # (rows=, table=) -> (verdict, evidence)
    paper_evidence: str = ""


# the checks a seed file's [[finding]] may name (``check = "better"``)
CHECKS: dict[str, Callable[..., tuple[str, str]]] = {
    "better": _better, "near": _near, "recovers": _recovers, "collapses": _collapses,
    "usable_below": _usable_below, "best_of": _best_of, "flat": _flat,
    "robust_as_float": _robust_as_float}


def _finding(paper: str, spec: dict) -> Finding:
    """A seed file's ``[[finding]]``: its check bound to its ``args`` (and its optional
    ``metric``: "es", "em" or "pass@1", and ``margin`` in that metric's units).

    Requires: ``spec["check"]`` is a key of ``CHECKS`` (else a ValueError naming it)."""
    if spec["check"] not in CHECKS:
        raise ValueError(f"{paper}: finding {spec['claim']!r}: unknown check "
                         f"{spec['check']!r} (checks: {', '.join(CHECKS)})")
    if spec.get("metric", "es") not in _NAME:
        raise ValueError(f"{paper}: finding {spec['claim']!r}: unknown metric "
                         f"{spec['metric']!r} (metrics: {', '.join(_NAME)})")
    opts = {k: spec[k] for k in ("metric", "margin") if k in spec}
    return Finding(paper, spec["claim"], spec["table"],
                   partial(CHECKS[spec["check"]], *spec.get("args", ()), **opts),
                   spec.get("paper_evidence", ""))


# every seed claim, in the order of the seed files (qdsl/study/data/*.toml)
FINDINGS: tuple[Finding, ...] = tuple(_finding(p, f) for p, f in finding_specs())


def evaluate(tables: dict[str, list[dict]]) -> list[dict]:
    """Every finding's verdict over the sweep's measured rows (with per-sample scores)."""
    rows = Rows(tables)
    out = []
    for f in FINDINGS:
        try:
            verdict, evidence = f.check(rows=rows, table=f.table)
        except _Missing as e:
            verdict, evidence = NOT_RUN, f"needs {e}"
        out.append({"paper": f.paper, "claim": f.claim, "table": f.table,
                    "verdict": verdict, "evidence": evidence, "paper_evidence": f.paper_evidence})
    return out


def counts(findings: list[dict]) -> dict[str, int]:
    return {v: sum(1 for f in findings if f["verdict"] == v) for v in VERDICTS}


def method_note(n: int) -> str:
    """How the verdicts were made (the header of findings.md and the findings block)."""
    mg = margins()
    return (f"Verdicts over {n} completion samples per row, from paired 95% confidence "
            "intervals against the named row (`qdsl/study/stats.py`): ES by the paired t "
            f"interval over the same samples (the seeded percentile bootstrap, "
            f"{BOOTSTRAP_RESAMPLES} resamples, printed beside it as a check); EM and "
            "HumanEval pass@1 by Newcombe's paired score interval with McNemar's exact "
            "test (discordant pairs b/c); perplexity as a ratio from paired per-window "
            "log-losses, where the cache recorded them. Margins "
            f"(`qdsl/study/data/margins.toml`): ES {mg['es']:g} points, EM {mg['em']:g}, "
            f"pass@1 {mg['pass1']:g}, perplexity {mg['ppl_pct']:g}%, robustness "
            f"{mg['robust_drop_pct']:g} %drop points. **reproduced**: the whole CI on the "
            "claim's side (an equivalence claim: inside the margin); **contradicted**: the "
            "whole CI on the other side; **inconclusive**: the CI straddles, so these "
            "samples cannot decide.")


def render(findings: list[dict], n: int) -> str:
    """Markdown: the method, the verdict counts, one line per finding by paper."""
    out = [method_note(n) + " " + ", ".join(f"{k}: {v}" for k, v in counts(findings).items())
           + ".", ""]
    for paper in dict.fromkeys(f["paper"] for f in findings):
        out += [f"**{paper}**", "", "| claim | table | paper | verdict | measured |",
                "|---|---|---|---|---|"]
        out += [f"| {f['claim']} | {f['table']} | {f['paper_evidence']} | **{f['verdict']}** "
                f"| {f['evidence']} |" for f in findings if f["paper"] == paper]
        out.append("")
    return "\n".join(out)
