"""``qdsl fmt FILE...``: canonical formatting of recipes.

Prints the canonical form (one file) by default; ``--write`` rewrites files in
place atomically; ``--check`` exits 1 if any file is not already formatted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..atomic import write_text_atomic
from ..cli import COMMANDS
from ..errors import RecipeError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fmt", help=COMMANDS["fmt"],
        description="Print recipes in canonical form: options in a fixed order, `->` aligned "
                    "within a block of rules, comments kept, blank-line runs collapsed. "
                    "The output parses to the same recipe.")
    p.add_argument("files", nargs="+", metavar="FILE", help="recipe files")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("-w", "--write", action="store_true", help="rewrite the files in place")
    mode.add_argument("--check", action="store_true",
                      help="print nothing; exit 1 if a file is not formatted")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..lang import format_text
    from ..lang.loader import read_text

    status = 0
    for path in map(Path, args.files):
        text, diags = read_text(path)
        errors = [d for d in diags if d.severity == "error"]
        if text is None or errors:
            print(RecipeError(errors or diags).format(), file=sys.stderr)
            status = 1
            continue
        try:
            formatted = format_text(text, str(path))
        except RecipeError as e:
            print(e.format(), file=sys.stderr)
            status = 1
            continue
        if args.check:
            if formatted != text:
                print(f"{path}: not formatted", file=sys.stderr)
                status = 1
        elif args.write:
            if formatted != text:
                write_text_atomic(path, formatted)
                print(f"formatted {path}", file=sys.stderr)
        else:
            sys.stdout.write(formatted)
    return status
