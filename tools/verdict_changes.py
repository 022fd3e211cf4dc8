"""The verdict counts of two versions of a sweep's findings, and every verdict that
changed between them, read from the sweeps' `results.json` (so a closing note's counts
are computed, never typed in). A version is a file, or REV:PATH for the file as
committed at a git revision.

    .venv/bin/python tools/verdict_changes.py 223dc77:results/sweep-qwen/results.json \\
        results/sweep-qwen/results.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from qdsl.study.findings import VERDICTS


def _read(spec: str) -> list[dict]:
    """The findings of a results.json named by path or by REV:PATH."""
    if not Path(spec).exists() and ":" in spec:
        rev, path = spec.split(":", 1)
        text = subprocess.run(["git", "show", f"{rev}:{path}"], check=True,
                              capture_output=True, text=True).stdout
    else:
        text = Path(spec).read_text()
    return json.loads(text).get("findings", [])


def changes(before: list[dict], after: list[dict]) -> list[tuple[str, str, str, str]]:
    """(table, claim, verdict before, verdict after) for each claim whose verdict differs;
    a claim only one side has reads 'absent' on the other."""
    b = {(f["table"], f["claim"]): f["verdict"] for f in before}
    a = {(f["table"], f["claim"]): f["verdict"] for f in after}
    return [(t, c, b.get((t, c), "absent"), a.get((t, c), "absent"))
            for t, c in sorted(b.keys() | a.keys()) if b.get((t, c)) != a.get((t, c))]


def counts(findings: list[dict]) -> str:
    c = Counter(f["verdict"] for f in findings)
    return ", ".join(f"{v} {c.get(v, 0)}" for v in VERDICTS)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before", help="results.json, or REV:PATH")
    ap.add_argument("after", help="results.json, or REV:PATH")
    args = ap.parse_args(argv)
    before, after = _read(args.before), _read(args.after)
    print(f"before ({args.before}): {counts(before)}")
    print(f"after  ({args.after}): {counts(after)}")
    rows = changes(before, after)
    print(f"{len(rows)} verdict(s) changed" + (":" if rows else ""))
    for table, claim, v0, v1 in rows:
        print(f"  {table}: {claim}: {v0} -> {v1}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
