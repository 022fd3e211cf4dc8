"""Safe output. No torch.

Files (``qdsl.atomic.files``, re-exported here): a temporary file in the same
directory, then ``os.replace``, so an interrupted write (Ctrl-C, a crash) never leaves
a half-written file. JSON is always standard JSON: NaN and Infinity are written as
``null``.

Directories (``output_dir``): every command that writes a directory claims it first,
before any long work, and the claim enforces one rule:

* one writer at a time: an ``flock`` on the sibling ``.OUT.lock`` (the kernel drops it
  when its process dies, so it is never stale); a second writer is refused at once,
  naming the holder's pid;
* qdsl replaces (``--force``) or reuses only a directory it wrote itself: one with
  its kind's marker file and nothing but the files that kind writes. A directory of
  anything else, a regular file or a symbolic link is refused, ``--force`` or not;
  an empty directory holds nothing to lose and is used;
* the new contents are written into ``.OUT.tmp-PID-XXXXXXXX`` and swapped into place
  at the end, so OUT is never missing or half written, even after SIGKILL; the
  temporary and replaced directories of dead processes are removed by the next claim
  (a replaced directory whose swap was cut off is put back as OUT).

    with output_dir("out/q", ARTIFACT, force=True) as claim:   # refused here, at once
        ...                                                    # hours of work
        with claim.stage() as tmp:                             # OUT replaced on success
            (tmp / "plan.json").write_text("{}")
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Iterator

from .. import __version__
from ..errors import ArtifactError, OutputError, QdslError
from .files import (atomic_path, finite, umasked, write_json_atomic,  # noqa: F401 (re-exported)
                    write_text_atomic)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ output directories

@dataclass(frozen=True)
class OutputKind:
    """A kind of directory a command writes, and how to recognise one it wrote."""

    name: str                 # for messages: "qdsl artifact"
    marker: str               # the file that identifies it
    files: tuple[str, ...]    # fnmatch patterns (``*`` spans ``/``) of every path it writes
    fmt: str = ""             # the marker's "format" where the claim writes it (reuse)
    error: type[QdslError] = OutputError

    def owns(self, rel: str, is_dir: bool) -> bool:
        """Whether ``rel`` (a path inside the directory, ``/``-separated) is one of its own."""
        if is_dir and any(p.startswith(rel + "/") for p in self.files):
            return True
        return any(fnmatchcase(rel, p) for p in self.files)


# qdsl compile -o OUT (qdsl.artifact; the marker is qdsl.artifact.store.MARKER)
ARTIFACT = OutputKind("qdsl artifact", "qdsl_artifact.json",
                      ("qdsl_artifact.json", "plan.json", "recipe.qrec",
                       "quant_params.safetensors", "model.safetensors", "model/*",
                       "graph.json"),
                      error=ArtifactError)
# qdsl sweep -o DIR (qdsl.study.sweep): reused in place, never replaced
SWEEP = OutputKind("qdsl sweep directory", "qdsl_sweep.json",
                   ("qdsl_sweep.json", "results.json", "tables.md", "findings.md", ".*.tmp",
                    "cache/*", "plots/*", "artifacts/*", "partial/*"), fmt="qdsl-sweep")

_HELD: dict[Path, OutputClaim] = {}   # claims this process holds (a command, then its save)


def foreign_entries(path: str | os.PathLike, kind: OutputKind, limit: int = 4) -> list[str]:
    """Up to ``limit`` paths inside ``path`` that ``kind`` never writes (symbolic links
    always count: qdsl writes none), as ``sub/name`` (a directory with a final ``/``)."""
    root, out = Path(path), []

    def walk(d: Path, prefix: str) -> None:
        for e in sorted(os.scandir(d), key=lambda e: e.name):
            if len(out) >= limit:
                return
            rel = prefix + e.name
            is_dir = e.is_dir(follow_symlinks=False)
            if e.is_symlink() or not kind.owns(rel, is_dir):
                out.append(rel + ("/" if is_dir else ""))
            elif is_dir:
                walk(Path(e.path), rel + "/")

    walk(root, "")
    return out


def _empty(d: Path) -> bool:
    with os.scandir(d) as it:
        return next(it, None) is None


def _names(entries: list[str], limit: int = 3) -> str:
    return ", ".join(entries[:limit]) + (", ..." if len(entries) > limit else "")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        return True
    except (OverflowError, ValueError, OSError):
        return False
    return True


# .OUT.tmp-PID-XXXXXXXX / .OUT.old-PID-XXXXXXXX; .OUT.old-PID and pid-less
# .OUT.tmp-XXXXXXXX are the names qdsl used before recording the pid
_LEFTOVER = re.compile(r"(?P<what>tmp|old)-(?:(?P<pid>\d+)(?:-[a-z0-9_]{8})?|[a-z0-9_]{8})")
_PIDLESS_AGE = 3600.0  # seconds: a pid-less temporary directory untouched this long is stale


def clean_stale(path: str | os.PathLike) -> list[str]:
    """Remove the temporary (``.OUT.tmp-*``) and replaced (``.OUT.old-*``) siblings of
    ``path`` left by dead processes; put a replaced directory back when ``path`` itself
    is missing (its swap was cut off). Returns what was removed or restored. Call it
    while holding the claim on ``path`` (``output_dir`` does)."""
    path = Path(path)
    prefix, done = f".{path.name}.", []
    found = []
    try:
        with os.scandir(path.parent) as it:
            for e in it:
                m = _LEFTOVER.fullmatch(e.name[len(prefix):])
                if e.name.startswith(prefix) and m and e.is_dir(follow_symlinks=False):
                    found.append((e.stat(follow_symlinks=False).st_mtime, e, m))
    except OSError:
        return done
    for mtime, e, m in sorted(found, key=lambda x: -x[0]):   # newest replaced dir first
        if m["pid"] is not None:
            if _alive(int(m["pid"])):
                continue
        elif time.time() - mtime < _PIDLESS_AGE:
            continue
        try:
            if m["what"] == "old" and not os.path.lexists(path):
                os.rename(e.path, path)
                log.warning("restored %s from %s (an interrupted replace)", path, e.name)
            else:
                shutil.rmtree(e.path)
            done.append(e.name)
        except OSError as err:
            log.warning("cannot remove stale %s: %s", e.path, err.strerror or err)
    return done


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or file system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


class OutputClaim:
    """The exclusive right to write one output directory (``output_dir``)."""

    def __init__(self, path: Path, kind: OutputKind, force: bool, fd: int, lock: Path,
                 shown: str | None = None):
        self.path, self.kind, self.force = path, kind, force
        self.shown = shown or str(path)   # the path as the user wrote it, for messages
        self._fd, self._lock = fd, lock

    def check(self, force: bool | None = None) -> None:
        """Refuse, with ``kind.error``, unless ``path`` is missing, an empty directory, or
        (``force``) a directory of this kind holding only its own files."""
        force = self.force if force is None else force
        p, k, n = self.path, self.kind, self.shown
        if os.path.islink(p):
            raise k.error(f"{n} is a symbolic link; qdsl replaces only a directory it wrote: "
                          "give the real path or another output")
        if not os.path.lexists(p):
            return
        if not p.is_dir():
            raise k.error(f"{n} exists and is not a directory; qdsl will not replace it")
        if _empty(p):
            return
        foreign = foreign_entries(p, k)
        if not (p / k.marker).is_file():
            raise k.error(f"{n} exists and is not a {k.name} (it holds {_names(foreign)}); "
                          "qdsl replaces only its own output, --force or not: choose another "
                          "output or remove it yourself")
        if foreign:
            raise k.error(f"{n} is a {k.name} but also holds {_names(foreign)}, which qdsl "
                          "did not write; move that out or choose another output")
        if not force:
            raise k.error(f"{n} exists (a {k.name}); pass --force to replace it")

    @contextmanager
    def stage(self) -> Iterator[Path]:
        """A new temporary directory that replaces ``path`` when the block completes;
        removed if it raises (KeyboardInterrupt included)."""
        tmp = Path(tempfile.mkdtemp(dir=self.path.parent,
                                    prefix=f".{self.path.name}.tmp-{os.getpid()}-"))
        os.chmod(tmp, umasked(0o777))   # as mkdir would make it, not mkdtemp's 0700
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.commit(tmp)

    def commit(self, tmp: Path) -> Path:
        """Put the directory ``tmp`` (a sibling of ``path``) in place of ``path``, checking
        again what ``path`` holds now. ``tmp`` is gone afterwards, whatever happens; on
        any failure ``path`` keeps its previous contents."""
        try:
            self.check()
            if not os.path.lexists(self.path):
                os.rename(tmp, self.path)
            elif _exchange(tmp, self.path):
                shutil.rmtree(tmp, ignore_errors=True)   # now the previous contents
            else:
                old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}-"
                                          f"{os.urandom(4).hex()}")
                os.rename(self.path, old)
                try:
                    os.rename(tmp, self.path)
                except BaseException:
                    os.rename(old, self.path)
                    raise
                shutil.rmtree(old, ignore_errors=True)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise self.kind.error(f"cannot write {self.shown}: {e.strerror or e}") from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.path

    def adopt(self) -> None:
        """Reuse ``path`` in place: create it (or use an empty directory) with the marker,
        or accept one with the marker, or one of this kind's files only (written before
        markers existed); refuse anything else."""
        p, k, n = self.path, self.kind, self.shown
        if os.path.lexists(p) and not p.is_dir():
            raise k.error(f"{n} exists and is not a directory")
        if (p / k.marker).is_file():
            return
        if p.is_dir() and not _empty(p):
            foreign = foreign_entries(p, k)
            if foreign:
                raise k.error(f"{n} is not a {k.name} (no {k.marker}; it holds "
                              f"{_names(foreign)}): give a new or empty directory, or one "
                              "qdsl wrote")
            log.info("%s: a %s without %s; adopting it", n, k.name, k.marker)
        p.mkdir(exist_ok=True)

        write_json_atomic(p / k.marker, {"format": k.fmt, "qdsl_version": __version__})

    def release(self) -> None:
        try:   # unlinked while still locked: a waiter that opened it notices (inode check)
            os.unlink(self._lock)
        except OSError:
            pass
        os.close(self._fd)


def _lock(path: Path, kind: OutputKind, shown: str) -> tuple[int, Path]:
    """Open and flock ``.NAME.lock`` beside ``path``; refuse at once if another process
    holds it."""
    lock = path.with_name(f".{path.name}.lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise kind.error(f"{shown} is being written by another qdsl process "
                             f"(pid {holder or 'unknown'}); wait for it or choose another "
                             "output") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd, lock
        os.close(fd)   # the holder released and unlinked it meanwhile: take the new one


@contextmanager
def output_dir(path: str | os.PathLike, kind: OutputKind = ARTIFACT, *, force: bool = False,
               reuse: bool = False) -> Iterator[OutputClaim]:
    """Claim the output directory ``path`` for this process: lock it, remove the stale
    leftovers of dead writers, and check what it holds (``OutputClaim.check``; with
    ``reuse``, ``OutputClaim.adopt``: the directory is written in place, e.g. a sweep's
    cache). Everything refused raises ``kind.error`` with one line, before any work.
    Nested claims on the same path in one process share the outer claim."""
    shown, path = os.fspath(path), Path(os.path.abspath(path))
    if not path.name:
        raise kind.error(f"{shown} cannot be an output directory; name a directory to write")
    if reuse and path.is_symlink() and path.is_dir():
        path = path.resolve()   # written in place: the lock goes beside the real directory
    held = _HELD.get(path)
    if held is not None:
        held.adopt() if reuse else held.check(force)
        yield held
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, lock = _lock(path, kind, shown)
    except OSError as e:
        raise kind.error(f"cannot write {shown}: {e.strerror or e}") from e
    claim = OutputClaim(path, kind, force, fd, lock, shown)
    _HELD[path] = claim
    try:
        clean_stale(path)
        try:
            claim.adopt() if reuse else claim.check()
        except OSError as e:
            raise kind.error(f"cannot write {shown}: {e.strerror or e}") from e
        yield claim
    finally:
        del _HELD[path]
        claim.release()


@contextmanager
def atomic_dir(out: str | os.PathLike, *, force: bool = False,
               kind: OutputKind = ARTIFACT) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` only if the block completes
    (``output_dir`` + ``OutputClaim.stage``: the same checks and lock)."""
    with output_dir(out, kind, force=force) as claim, claim.stage() as tmp:
        yield tmp
