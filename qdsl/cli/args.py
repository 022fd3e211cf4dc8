"""Argument types shared by the subcommands: every number and output path is checked
by argparse itself, before anything is loaded, so a bad value is one line and exit 2:

    qdsl eval: error: argument --n: must be a positive integer, got -1

Integers are capped at ``MAX_INT`` (2**31 - 1) unless a tighter range applies, so a
huge value is refused here rather than overflowing in torch or allocating forever.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Callable

MAX_INT = 2**31 - 1
MAX_SEED = 2**32 - 1     # what numpy / torch generators accept
MAX_THREADS = 1024
HUMANEVAL_PROBLEMS = 164


def _parse_int(text: str, what: str) -> int:
    try:
        return int(text.strip(), 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def int_range(lo: int, hi: int = MAX_INT, what: str | None = None) -> Callable[[str], int]:
    """An argparse ``type`` accepting integers ``lo <= n <= hi``."""
    what = what or (f"an integer of at least {lo}" if hi == MAX_INT
                    else f"an integer from {lo} to {hi}")

    def parse(text: str) -> int:
        n = _parse_int(text, what)
        if not lo <= n <= hi:
            got = text if len(text) <= 30 else text[:27] + "..."
            raise argparse.ArgumentTypeError(f"must be {what}, got {got}")
        return n

    parse.__name__ = "integer"  # argparse's fallback message: "invalid integer value"
    return parse


positive_int = int_range(1, MAX_INT, "a positive integer")
nonneg_int = int_range(0, MAX_INT, "a non-negative integer")
seed_int = int_range(0, MAX_SEED, f"an integer from 0 to {MAX_SEED}")


def _float_range(lo: float, strict: bool, what: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not math.isfinite(x) or x < lo or (strict and x == lo):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return x

    parse.__name__ = "number"
    return parse


positive_float = _float_range(0.0, True, "a positive finite number")
nonneg_float = _float_range(0.0, False, "a non-negative finite number")


def output_file(*suffixes: str) -> Callable[[str], str]:
    """An argparse ``type`` for a file to write: one of ``suffixes`` (case-insensitive),
    not a directory, in a directory that exists or can be created (the writers create
    missing parents)."""
    def parse(text: str) -> str:
        path = Path(text).expanduser()
        if suffixes and path.suffix.lower() not in suffixes:
            raise argparse.ArgumentTypeError(
                f"{text}: unsupported file type {path.suffix or '(none)'!r}; "
                f"use {' or '.join(suffixes)}")
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text}: is a directory, expected a file")
        _check_parent(text, path)
        return text

    parse.__name__ = "file name"
    return parse


def output_dir(text: str) -> str:
    """An argparse ``type`` for a directory to write: not an existing file, inside a
    directory that exists or can be created."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: exists and is not a directory")
    _check_parent(text, path)
    return text


def add_recipe_model(p: argparse.ArgumentParser, model_help: str) -> None:
    """The positional RECIPE and the required ``--model`` of the commands that run a
    recipe on a model (compile, train, explain)."""
    p.add_argument("recipe", help=".qrec file")
    p.add_argument("--model", required=True, help=model_help)


def add_artifact_out(p: argparse.ArgumentParser,
                     force_help: str = "replace OUT if it is a qdsl artifact") -> None:
    """``-o/--out``, the artifact directory to write (``output_dir``), and ``--force``
    (the commands that write an artifact: compile, train)."""
    p.add_argument("-o", "--out", required=True, type=output_dir,
                   help="artifact directory to write")
    p.add_argument("--force", action="store_true", help=force_help)


def _check_parent(text: str, path: Path) -> None:
    """The nearest existing ancestor of ``path`` must be a writable directory."""
    parent = path.absolute().parent
    while not parent.exists():
        if parent.is_symlink():  # a dangling link: creating below it fails
            raise argparse.ArgumentTypeError(f"{text}: {parent} is a broken symbolic link")
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text}: directory {parent} is not writable")
