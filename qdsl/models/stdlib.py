"""The Python standard library as a code corpus: a deterministic split of its
source files into train / valid / test, shared by ``tools/train_reference.py``
(which trains ``stdlib-gpt2`` on ``train``) and ``qdsl eval --bench stdlib``
(which scores every model on ``test``).

* test: every file under a test tree (a directory named ``test``, ``tests`` or
  ``idle_test``: ``test/``, ``unittest/test/``, ``idlelib/idle_test/``,
  ``lib2to3/tests/`` ...) and every ``test_*.py`` file. Held out.
* valid / train: the rest, by a hash of the relative path (about 5% valid), so
  the split does not depend on the order a file system lists files in.

``site-packages`` (third-party code) and non-``.py`` files are never part of it.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

TEST_DIRS = frozenset({"test", "tests", "idle_test"})
SKIP_DIRS = frozenset({"site-packages", "__pycache__", "dist-packages"})
VALID_PER_MILLE = 50


def stdlib_dir() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(rel: str) -> str:
    """'train', 'valid' or 'test' for a path relative to the stdlib root.

    >>> split_of("test/test_os.py"), split_of("idlelib/idle_test/test_run.py")
    ('test', 'test')
    """
    parts = Path(rel).parts
    if any(p in TEST_DIRS for p in parts[:-1]) or parts[-1].startswith("test_"):
        return "test"
    h = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:4], "big") % 1000
    return "valid" if h < VALID_PER_MILLE else "train"


def stdlib_files(split: str, root: Path | None = None) -> list[Path]:
    """The ``.py`` files of one split, sorted by relative path."""
    assert split in ("train", "valid", "test"), split
    root = stdlib_dir() if root is None else Path(root)
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts[:-1]) or not p.is_file():
            continue
        if split_of(rel.as_posix()) == split:
            out.append(p)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())
