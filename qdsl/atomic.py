"""Atomic file writes: a temporary file in the same directory, then ``os.replace``,
so an interrupted write (Ctrl-C, a crash) never leaves a half-written file. No torch."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically, keeping an existing file's permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any, **dump_kwargs) -> None:
    """``json.dumps(obj, indent=1)`` written atomically, with a final newline."""
    write_text_atomic(path, json.dumps(obj, indent=1, **dump_kwargs) + "\n")
