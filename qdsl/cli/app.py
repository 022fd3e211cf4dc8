"""The ``qdsl`` command line: parses arguments and calls one library function per
subcommand. Each subcommand lives in ``qdsl/cli/commands/<name>.py`` and defines
``register(subparsers)``, which adds its parser and sets ``func(args) -> int``.

User errors (``QdslError``) are printed without a traceback (exit 2), and so are
the operating system's (``OSError``: a full disk, a permission) and anything
unexpected (exit 3, "internal error", the traceback only with ``-v``). Ctrl-C and
SIGTERM exit 130 / 143 after the command's cleanup (temporary files) has run.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import signal
import sys
import traceback

from .. import __version__
from ..errors import QdslError
from .names import COMMANDS



def _available() -> list[str]:
    return [c for c in COMMANDS if importlib.util.find_spec(f"qdsl.cli.commands.{c}") is not None]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qdsl",
        description="Declarative quantization recipes for PyTorch code models: "
                    "check and format .qrec files, explain what a recipe selects, "
                    "compile or train, evaluate, benchmark and export quantized models.")
    parser.add_argument("--version", action="version", version=f"qdsl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _available():
        if name == only:
            importlib.import_module(f"qdsl.cli.commands.{name}").register(sub)
        else:  # listed in --help without importing its (possibly heavy) module
            sub.add_parser(name, help=COMMANDS[name], add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=first if first in COMMANDS else None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    previous = _terminate_as_interrupt()
    try:
        return int(args.func(args) or 0)
    except QdslError as e:
        print(e.format(), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 143 if _terminated else 130
    except OSError as e:  # the system's word (disk full, permission denied), not a bug
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: out of memory (try a smaller model, fewer samples or --threads 1)",
              file=sys.stderr)
        return 2
    except Exception as e:  # a bug in qdsl: say so in one line; the traceback with -v
        if args.verbose:
            traceback.print_exc()
        print(f"internal error: {type(e).__name__}: {str(e)[:300]} (a bug in qdsl; "
              "rerun with -v for the traceback and report it)", file=sys.stderr)
        return 3
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


_terminated = False


def _terminate_as_interrupt():
    """SIGTERM raises KeyboardInterrupt, so ``finally`` / ``except BaseException``
    cleanup (temporary directories, output locks) runs as it does for Ctrl-C.
    Returns the previous handler (None where signals cannot be set: not the main thread)."""
    def handler(signum, frame):
        global _terminated
        _terminated = True
        raise KeyboardInterrupt

    global _terminated
    _terminated = False
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None


if __name__ == "__main__":
    sys.exit(main())
