"""Sample sizes from precision: how many completion samples a row needs for a target
half-width of its paired ES confidence interval, from what a sweep measured.

A sweep's ``results.json`` rows carry their paired difference from the float row
(``vs_float.es``: the t interval, with ``sd`` the SD of the per-sample differences
and ``n`` the samples) and the seconds their completions took (``complete_seconds``
over ``complete_n`` samples; rows cached before 2026-12-07 have only ``eval_seconds``,
the completions plus the perplexity windows, so their seconds per sample are an upper
bound for the completions alone). ``needs`` turns one row into the n of
``qdsl.study.stats.n_for_halfwidth`` and the evaluation time that n would cost at the
measured rate; ``precision_table`` lays a model's rows out as markdown (the headline
table's "precision" block, ``tools/headline.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .stats import n_for_halfwidth

HALF_WIDTH = 1.5   # ES points: the target the issue sets for the headline rows
NEAR = 10.0        # ES points: a row this close to the float row is "near" it


@dataclass(frozen=True)
class Need:
    label: str
    diff: float          # the row's mean ES difference from the float row (points)
    sd: float            # SD of the paired per-sample ES differences (points)
    n: int               # samples measured
    half_width: float    # the measured CI's half-width
    n_needed: int        # samples for the target half-width at this SD
    sec_per_sample: float | None   # complete_seconds / complete_n, else eval_seconds / n
    upper_bound: bool = False      # sec_per_sample from eval_seconds (perplexity included)


def needs(label: str, row: dict | None, half_width: float = HALF_WIDTH) -> Need | None:
    """The row's precision, or None where it has no paired ES interval (the float row,
    a row not run, an older results.json)."""
    es = ((row or {}).get("vs_float") or {}).get("es")
    if not isinstance(es, dict) or es.get("sd") is None:
        return None
    if row.get("complete_seconds") and row.get("complete_n"):
        rate, bound = row["complete_seconds"] / row["complete_n"], False
    else:
        secs = row.get("eval_seconds")
        rate, bound = (secs / es["n"] if secs and es["n"] else None), True
    return Need(label, es["est"], es["sd"], es["n"], (es["hi"] - es["lo"]) / 2,
                n_for_halfwidth(es["sd"], half_width), rate, bound)


def precision_table(model: str, rows: list[tuple[str, dict | None]],
                    half_width: float = HALF_WIDTH) -> str:
    """Markdown: per row the paired SD, today's half-width and the n for ``half_width``,
    then the n the model needs (the largest) and what evaluating every listed row at
    that n would take at the measured seconds per sample."""
    got = [x for x in (needs(label, row, half_width) for label, row in rows) if x]
    if not got:
        return f"{model}: no paired ES intervals in its results (not run, or an older sweep).\n"
    lines = [f"| {model} row | paired ES SD | n now | half-width now | n for ±{half_width:g} |",
             "|---|---|---|---|---|"]
    lines += [f"| {x.label} | {x.sd:.1f} | {x.n} | {x.half_width:.1f} | {x.n_needed:,} |"
              for x in got]
    n_max = max(x.n_needed for x in got)
    close = [x for x in got if abs(x.diff) <= NEAR]
    timed = [x for x in got if x.sec_per_sample]
    exact = [x for x in timed if not x.upper_bound]
    timed = exact or timed            # the completions' own times where rows have them
    secs = [x.sec_per_sample for x in timed]
    hours = sum(secs) / len(secs) * n_max * len(got) / 3600 if secs else None
    text = (f"\n\n{model}: every listed row within ±{half_width:g} ES points needs n = "
            f"{n_max:,} (the largest paired SD, {max(x.sd for x in got):.1f})")
    if close:
        text += (f"; the {len(close)} rows within {NEAR:g} ES points of the float row (whose "
                 f"near-lossless claims need the precision) need at most "
                 f"{max(x.n_needed for x in close):,}")
    if hours is not None:
        rate = sum(secs) / len(secs)
        how = (f"completions only, mean of {len(timed)} row{'s' * (len(timed) != 1)}" if exact else
               "evaluation only, perplexity included: an upper bound")
        text += (f". At the measured {rate:.1f} s per sample and row ({how}), "
                 f"{len(got)} rows at n = {n_max:,} take about {hours:.1f} h of "
                 f"single-thread {'completion' if exact else 'evaluation'}")
        n_near = max((x.n_needed for x in close), default=n_max)
        if n_near < n_max:
            text += f", at n = {n_near:,} about {rate * n_near * len(got) / 3600:.1f} h"
    return "\n".join(lines) + text + ".\n"
