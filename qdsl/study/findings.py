"""The seed papers' findings as checks over a sweep's measured tables.

Each ``Finding`` states one claim of a seed paper (Storti 2023, Wei et al. 2023) and
a check that reads the rows of ``results.json``'s tables and returns a verdict with
the numbers behind it. ``qdsl sweep`` writes them to ``DIR/findings.md`` and into
the results document (``--doc``), so which findings reproduced is computed from
what was measured, never typed in. The claims themselves (which check, on which
rows) are data: ``[[finding]]`` entries of the seed files (``qdsl.study.seeds``).

Verdicts:

* ``reproduced`` / ``not reproduced``: the measured difference clears the noise
  margin in the claim's direction / against it (or a level claim holds / fails);
* ``within noise``: the difference is smaller than the margin, so this sample
  cannot tell (ES over n samples has a standard error of about 30 / sqrt(n)
  points; the margin is ``NOISE_SIGMAS`` standard errors of a difference);
* ``not run yet``: a row the check needs has no result.

Perplexity (over the same windows for every row) is printed as the finer-grained
second witness: it moves long before ES does. Rows with a HumanEval job (``qdsl sweep
--humaneval``) print their pass@1, and a Wei et al. claim whose rows all have one is
decided by pass@1 (their metric) instead of ES.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

from .seeds import finding_specs

REPRODUCED, NOT_REPRODUCED, NOISE, NOT_RUN = ("reproduced", "not reproduced",
                                              "within noise", "not run yet")
ES_SD = 30.0            # per-sample SD of edit similarity, measured on this benchmark
NOISE_SIGMAS = 2.0      # a difference must exceed 2 standard errors


class _Missing(Exception):
    pass


class Rows:
    """The measured rows of a sweep's tables, by (table, label)."""

    def __init__(self, tables: dict[str, list[dict]], n: int):
        self.tables, self.n = tables, max(n, 1)

    def get(self, table: str, label: str) -> dict:
        for row in self.tables.get(table, []):
            if row["label"] == label:
                if row.get("es") is None or row.get("em") is None:   # null: not measured
                    raise _Missing(f"{table}: {label}")
                return row
        raise _Missing(f"{table}: {label}")

    @property
    def margin(self) -> float:
        """ES points a difference of two rows must exceed: 2 x sqrt(2) x SD / sqrt(n)."""
        return NOISE_SIGMAS * math.sqrt(2) * ES_SD / math.sqrt(self.n)


def _row_text(label: str, r: dict) -> str:
    ppl = r.get("ppl")
    ppl_s = "-" if ppl is None else f"{ppl:,.1f}" if ppl < 1e5 else f"{ppl:.2g}"
    he = r.get("humaneval")
    he_s = f", HumanEval pass@1 {100 * he['pass@1']:.1f}% of {he['problems']}" if he else ""
    return f"{label}: ES {r['es']:.1f}, EM {r['em']:.0f}, ppl {ppl_s}{he_s}"


def _pass1(ra: dict, rb: dict) -> tuple[float, float] | None:
    """(pass@1 difference a - b, its noise margin) in points when both rows have a
    HumanEval job over the same problems, else None. Margin: NOISE_SIGMAS standard
    errors of a difference of two proportions at their pooled rate (unpaired, so
    conservative: the same problems are scored twice)."""
    ha, hb = ra.get("humaneval"), rb.get("humaneval")
    if not ha or not hb or ha["problems"] != hb["problems"]:
        return None
    p = (ha["pass@1"] + hb["pass@1"]) / 2
    margin = NOISE_SIGMAS * 100 * math.sqrt(2 * p * (1 - p) / ha["problems"])
    return 100 * (ha["pass@1"] - hb["pass@1"]), max(margin, 100 / ha["problems"])


def _better(a: str, b: str, *, rows: Rows, table: str) -> tuple[str, str]:
    """Claim: row ``a`` scores higher than row ``b``: by HumanEval pass@1 (the paper's
    metric) when both rows have it, else by ES."""
    ra, rb = rows.get(table, a), rows.get(table, b)
    he = _pass1(ra, rb)
    if he is not None:
        d, margin = he
        verdict = REPRODUCED if d > margin else NOT_REPRODUCED if d < -margin else NOISE
        return verdict, (f"{_row_text(a, ra)}; {_row_text(b, rb)}; Δpass@1 {d:+.1f} "
                         f"(margin {margin:.1f}; decided by HumanEval)")
    d = ra["es"] - rb["es"]
    verdict = (REPRODUCED if d > rows.margin else NOT_REPRODUCED if d < -rows.margin
               else NOISE)
    text = f"{_row_text(a, ra)}; {_row_text(b, rb)}; ΔES {d:+.1f}"
    return verdict, text + (_ppl_witness(a, ra, b, rb) if verdict == NOISE else "")


def _ppl_witness(a: str, ra: dict, b: str, rb: dict) -> str:
    """Which row perplexity favours, when ES cannot tell (5% apart or more)."""
    pa, pb = ra.get("ppl"), rb.get("ppl")
    if not pa or not pb or max(pa, pb) / min(pa, pb) < 1.05:
        return "; perplexity cannot tell either"
    return f"; perplexity favours {a if pa < pb else b}"


def _near(a: str, base: str, *, rows: Rows, table: str) -> tuple[str, str]:
    """Claim: row ``a`` is within the noise margin of ``base`` (near lossless), by
    HumanEval pass@1 when both rows have it, else by ES."""
    ra, rb = rows.get(table, a), rows.get(table, base)
    he = _pass1(ra, rb)
    if he is not None:
        d, margin = he
        return (REPRODUCED if d >= -margin else NOT_REPRODUCED,
                f"{_row_text(a, ra)}; {_row_text(base, rb)}; Δpass@1 {d:+.1f} "
                f"(margin {margin:.1f}; decided by HumanEval)")
    d = ra["es"] - rb["es"]
    return (REPRODUCED if d >= -rows.margin else NOT_REPRODUCED,
            f"{_row_text(a, ra)}; {_row_text(base, rb)}; ΔES {d:+.1f}")


def _recovers(fixed: str, broken: str, base: str,
              share: float = 0.5, *, rows: Rows, table: str) -> tuple[str, str]:
    """Claim: ``fixed`` wins back at least ``share`` of the ES ``broken`` lost vs ``base``."""
    rf, rb, r0 = rows.get(table, fixed), rows.get(table, broken), rows.get(table, base)
    lost = r0["es"] - rb["es"]
    won = rf["es"] - rb["es"]
    text = (f"{_row_text(fixed, rf)}; {_row_text(broken, rb)}; {_row_text(base, r0)}; "
            f"recovers {won:.1f} of {lost:.1f} ES points")
    if lost <= rows.margin:
        return NOISE, text + " (nothing measurable was lost)"
    return (REPRODUCED if won >= share * lost else NOT_REPRODUCED), text


def _collapses(a: str, base: str, *, rows: Rows, table: str) -> tuple[str, str]:
    """Claim: row ``a`` loses at least half of the baseline's ES (of its pass@1 when
    both rows have HumanEval)."""
    ra, r0 = rows.get(table, a), rows.get(table, base)
    text = f"{_row_text(a, ra)}; {_row_text(base, r0)}"
    if _pass1(ra, r0) is not None:
        kept = ra["humaneval"]["pass@1"] < 0.5 * r0["humaneval"]["pass@1"]
        return (REPRODUCED if kept else NOT_REPRODUCED), text + " (decided by HumanEval)"
    return (REPRODUCED if ra["es"] < 0.5 * r0["es"] else NOT_REPRODUCED), text


def _best_of(a: str, others: list[str], *, rows: Rows, table: str) -> tuple[str, str]:
    """Claim: row ``a`` is the best of ``others`` (every other row measured)."""
    ra = rows.get(table, a)
    rest = {o: rows.get(table, o) for o in others if o != a}
    top, rt = max(rest.items(), key=lambda kv: kv[1]["es"])
    d = ra["es"] - rt["es"]
    verdict = (REPRODUCED if d > rows.margin else NOT_REPRODUCED if d < -rows.margin
               else NOISE)
    return verdict, f"{_row_text(a, ra)}; best other: {_row_text(top, rt)}; ΔES {d:+.1f}"


def _flat(labels: list[str], min_rows: int = 3, *, rows: Rows,
          table: str) -> tuple[str, str]:
    """Claim: the rows' ES spread stays within the noise margin; decided once at least
    ``min_rows`` of them have run (the missing ones are named)."""
    got, missing = {}, []
    for x in labels:
        try:
            got[x] = rows.get(table, x)
        except _Missing:
            missing.append(x)
    if len(got) < min_rows:
        raise _Missing(f"{table}: {missing[0]}")
    spread = max(r["es"] for r in got.values()) - min(r["es"] for r in got.values())
    return (REPRODUCED if spread <= rows.margin else NOT_REPRODUCED,
            "; ".join(_row_text(x, r) for x, r in got.items()) + f"; ES spread {spread:.1f}"
            + (f" ({', '.join(missing)} not run yet)" if missing else ""))


def _paired_pct_drop_diff(rq: dict, r0: dict) -> tuple[float, float] | None:
    """(%drop of q - %drop of the base, its standard error), paired over the samples.

    Sample i contributes 100 * d_i / ES, d_i = its clean ES - its perturbed ES (0 where
    the perturbation left the prompt alone), so the mean is the %drop; the two models
    share the samples, so the SE comes from the per-sample differences. None without
    per-sample clean scores (``es_clean``)."""
    def contrib(r):
        ps = r.get("perturbed_samples")
        if ps is None or not r.get("es") or any("es_clean" not in x for x in ps):
            return None
        return {x["id"]: 100.0 * (x["es_clean"] - x["es"]) / r["es"] for x in ps}
    cq, c0 = contrib(rq), contrib(r0)
    n = rq.get("n") or 0
    if cq is None or c0 is None or n < 2 or n != r0.get("n"):
        return None
    x = [cq.get(i, 0.0) - c0.get(i, 0.0) for i in set(cq) | set(c0)]
    x += [0.0] * (n - len(x))
    mean = sum(x) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in x) / (n - 1))
    return mean, sd / math.sqrt(n)


def _less_robust(quantized: list[str], base: str, *, rows: Rows,
                 table: str) -> tuple[str, str]:
    """Claim: quantized models drop more ES under perturbation than the float model.

    Each quantized row's %drop is compared with the float one's, paired per sample; it
    counts as more (less) fragile when the difference exceeds ``NOISE_SIGMAS`` standard
    errors. Reproduced when every quantized row is more fragile, not reproduced when
    one is less fragile, within noise otherwise. Without per-sample scores (older
    caches) the drops are compared by direction alone, and say so: reproduced when
    every row drops more, not reproduced when none does, within noise when mixed."""
    def robust(label):
        r = rows.get(table, label).get("robust")
        if not r:
            raise _Missing(f"{table}: {label} (perturbed run)")
        if r.get("es_drop_pct") is None:   # a clean ES of 0: no %drop to compare
            raise _Missing(f"{table}: {label} (an ES %drop; its clean ES is 0)")
        return r
    r0 = robust(base)
    more = less = 0
    parts, paired_any, direction_only = [], False, False
    for q in quantized:
        rq = robust(q)
        diff = rq["es_drop_pct"] - r0["es_drop_pct"]
        paired = _paired_pct_drop_diff(rq, r0)
        if paired is None:
            direction_only = True
            more, less = more + (diff > 0), less + (diff < 0)
            parts.append(f"{q}: {rq['es_drop_pct']:.1f}% (direction only)")
            continue
        paired_any = True
        margin = NOISE_SIGMAS * paired[1]
        more, less = more + (paired[0] > margin), less + (paired[0] < -margin)
        parts.append(f"{q}: {rq['es_drop_pct']:.1f}% ({diff:+.1f} ± {margin:.1f})")
    text = f"{base}: ES drop {r0['es_drop_pct']:.1f}%; " + "; ".join(parts)
    if paired_any:
        text += f" (± {NOISE_SIGMAS:g} paired standard errors)"
    if more == len(quantized):
        return REPRODUCED, text
    refuted = not more if direction_only else less > 0
    return (NOT_REPRODUCED if refuted else NOISE), text


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
    "best_of": _best_of, "flat": _flat, "less_robust": _less_robust}


def _finding(paper: str, spec: dict) -> Finding:
    """A seed file's ``[[finding]]``: its check bound to its ``args``.

    Requires: ``spec["check"]`` is a key of ``CHECKS`` (else a ValueError naming it)."""
    if spec["check"] not in CHECKS:
        raise ValueError(f"{paper}: finding {spec['claim']!r}: unknown check "
                         f"{spec['check']!r} (checks: {', '.join(CHECKS)})")
    return Finding(paper, spec["claim"], spec["table"],
                   partial(CHECKS[spec["check"]], *spec.get("args", ())),
                   spec.get("paper_evidence", ""))


# every seed claim, in the order of the seed files (qdsl/study/data/*.toml)
FINDINGS: tuple[Finding, ...] = tuple(_finding(p, f) for p, f in finding_specs())


def evaluate(tables: dict[str, list[dict]], n: int) -> list[dict]:
    """Every finding's verdict over results.json's ``tables`` (``n`` samples per row)."""
    rows = Rows(tables, n)
    out = []
    for f in FINDINGS:
        try:
            verdict, evidence = f.check(rows=rows, table=f.table)
        except _Missing as e:
            verdict, evidence = NOT_RUN, f"needs {e}"
        out.append({"paper": f.paper, "claim": f.claim, "table": f.table,
                    "verdict": verdict, "evidence": evidence, "paper_evidence": f.paper_evidence})
    return out


def render(findings: list[dict], n: int) -> str:
    """Markdown: one line per finding, grouped by paper, with the verdict counts."""
    margin = Rows({}, n).margin
    counts = {v: sum(1 for f in findings if f["verdict"] == v)
              for v in (REPRODUCED, NOT_REPRODUCED, NOISE, NOT_RUN)}
    out = [f"Verdicts over {n} samples per row: a difference counts when it exceeds "
           f"{margin:.1f} ES points (2 standard errors of a difference of two rows). "
           + ", ".join(f"{k}: {v}" for k, v in counts.items()) + ".", ""]
    if any("decided by HumanEval" in f["evidence"] for f in findings):
        out[0] += (" Claims marked *decided by HumanEval* compare pass@1 instead, with a "
                   "margin of 2 standard errors of a difference of two pass rates.")
    for paper in dict.fromkeys(f["paper"] for f in findings):
        out += [f"**{paper}**", "", "| claim | table | paper | verdict | measured |",
                "|---|---|---|---|---|"]
        out += [f"| {f['claim']} | {f['table']} | {f['paper_evidence']} | **{f['verdict']}** "
                f"| {f['evidence']} |" for f in findings if f["paper"] == paper]
        out.append("")
    return "\n".join(out)
