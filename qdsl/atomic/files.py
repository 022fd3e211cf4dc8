"""Atomic files: a temporary file in the same directory, then ``os.replace``, so an
interrupted write (Ctrl-C, a crash) never leaves a half-written file. JSON is always
standard JSON: NaN and Infinity are written as ``null``. No torch.

``write_text_atomic`` / ``write_json_atomic`` for text; ``atomic_path`` for a writer
that takes a path (safetensors' ``save_file``, matplotlib's ``savefig``). ``qdsl fmt``
rewrites a user's file its own way (``qdsl.cli.commands.fmt.rewrite``: it keeps hard
links, owner and extended attributes, which a rename would lose).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp",
                mode: int | None = None) -> Iterator[Path]:
    """A fresh temporary file beside ``path`` (``.NAME.XXXXXXXX`` + ``suffix``; give a
    suffix ending in the extension a writer reads, e.g. ``.tmp.png``) for the block to
    write. On a clean exit it replaces ``path`` in one rename, with an existing file's
    permission bits, else ``mode`` (None: what ``open`` gives, 0o666 less the umask);
    if the block raises it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        else:
            os.chmod(tmp, umasked(0o666) if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def umasked(mode: int) -> int:
    """``mode`` less this process's umask: what ``open`` / ``mkdir`` would create."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8, ``\\n`` line ends) to ``path`` atomically, keeping an
    existing file's permissions; a new file gets what ``open`` would give it (0o666
    less the umask: 0644 under the usual 022), not ``mkstemp``'s private 0600."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)


def finite(obj: Any) -> Any:
    """``obj`` with every NaN / Infinity float (an empty or overflowed measurement)
    replaced by None, so that it is standard JSON: ``{"ppl": nan} -> {"ppl": None}``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_json_atomic(path: str | os.PathLike, obj: Any, **dump_kwargs) -> None:
    """``json.dumps(obj, indent=1)`` written atomically, with a final newline; NaN and
    Infinity become null (``allow_nan=False`` guards the rest)."""
    kwargs = {"indent": 1, **dump_kwargs, "allow_nan": False}
    write_text_atomic(path, json.dumps(finite(obj), **kwargs) + "\n")
