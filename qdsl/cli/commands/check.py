"""``qdsl check FILE...``: report every error and warning in recipe files.

Exit status: 0 clean (warnings allowed), 1 if any file has an error.
"""

from __future__ import annotations

import argparse
import json
import sys

from ...lang import check_file
from ..names import COMMANDS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check", help=COMMANDS["check"],
        description="Parse and check .qrec recipe files (and the files they include). "
                    "Every error is printed as FILE:LINE:COL with the line, a caret and a "
                    "hint. Exit status 1 if any file has an error.")
    p.add_argument("files", nargs="+", metavar="FILE", help="recipe files to check")
    p.add_argument("-q", "--quiet", action="store_true", help="print errors only, no summary")
    p.add_argument("--format", choices=("text", "json"), default="text",
                   help="json: one JSON list on stdout of every diagnostic (file, line, column, "
                        "severity, message, hint), for editors (docs/export.md#editors)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.format == "json":
        found = [d for path in args.files for d in check_file(path)]
        print(json.dumps([{"file": d.file, "line": d.line, "column": d.col,
                           "severity": d.severity, "message": d.message, "hint": d.hint}
                          for d in found], indent=1))
        return 1 if any(d.severity == "error" for d in found) else 0
    failed = 0
    for path in args.files:
        diags = check_file(path)
        for d in diags:
            print(d.format(), file=sys.stderr)
        errors = sum(d.severity == "error" for d in diags)
        failed += errors > 0
        if not args.quiet:
            status = f"{errors} error{'s' * (errors != 1)}" if errors else "ok"
            warnings = len(diags) - errors
            status += f", {warnings} warning{'s' * (warnings != 1)}" if warnings else ""
            print(f"{path}: {status}")
    return 1 if failed else 0
