"""The seed papers' data: ``qdsl/study/data/*.toml``, one file per paper.

Each file names its paper (``paper = "Storti 2023"``) and holds its tables
(``[[table]]``: name, title, kind, ``paper_cols``, rows) and its claims
(``[[finding]]``: claim, table, the check that decides it and its arguments, the
paper's evidence). ``qdsl.study.tables`` builds its ``Table``s from the tables and
``qdsl.study.findings`` its ``Finding``s from the claims; the logic stays in Python.
Files are read in name order, and within a file in their written order: that is the
order of ``--table all``, of the reports and of the findings. ``data/margins.toml`` is
not a paper: it holds the equivalence margins every verdict uses (``margins()``).
"""

from __future__ import annotations

import tomllib
from functools import cache
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
MARGINS = DATA / "margins.toml"
MARGIN_KEYS = ("es", "em", "pass1", "ppl_pct", "robust_drop_pct")


@cache
def papers() -> tuple[dict, ...]:
    """Every seed paper's file, parsed, in name order.

    Requires: ``DATA`` holds valid TOML files. Guarantees: the same (cached) dicts on
    every call; callers must not mutate them."""
    return tuple(tomllib.loads(f.read_text(encoding="utf-8"))
                 for f in sorted(DATA.glob("*.toml")) if f != MARGINS)


@cache
def margins() -> dict[str, float]:
    """The equivalence margins of ``data/margins.toml`` (``[margins]``: es, em, pass1,
    ppl_pct, robust_drop_pct), each a positive number; a ValueError naming the file
    and the key otherwise."""
    got = tomllib.loads(MARGINS.read_text(encoding="utf-8")).get("margins", {})
    for k in MARGIN_KEYS:
        v = got.get(k)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{MARGINS}: [margins] {k} must be a positive number (got {v!r})")
    return {k: float(got[k]) for k in MARGIN_KEYS}


def table_specs() -> list[dict]:
    """Every ``[[table]]`` of every paper, in order."""
    return [t for p in papers() for t in p.get("table", [])]


def finding_specs() -> list[tuple[str, dict]]:
    """(paper, ``[[finding]]``) for every claim of every paper, in order."""
    return [(p["paper"], f) for p in papers() for f in p.get("finding", [])]
