"""``qdsl fmt FILE...``: canonical formatting of recipes.

Prints the canonical form by default; ``--write`` rewrites the files that
change (``rewrite``: through symlinks, keeping hard links, mode and owner,
refusing read-only files and files changed while formatting); ``--check``
names each file that is not already formatted and exits 1. A file that cannot
be read, formatted or written gets its own error; the other files are still
done, and the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import tempfile
from pathlib import Path

from ... import lang
from ...lang.loader import MAX_FILE_BYTES, read_text
from ..names import COMMANDS
from ...errors import RecipeError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fmt", help=COMMANDS["fmt"],
        description="Print recipes in canonical form: options in a fixed order, `->` aligned "
                    "within a block of rules, comments kept, blank-line runs collapsed. "
                    "The output parses to the same recipe. With --write, each file is "
                    "rewritten through its symlinks, keeping hard links, mode and owner; a "
                    "read-only file (no write bit, even for root) or one that changed while "
                    "being formatted is not written. Errors are per file; the other files "
                    "are still done; exit status 1 if any file failed.")
    p.add_argument("files", nargs="+", metavar="FILE", help="recipe files")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("-w", "--write", action="store_true",
                      help="rewrite the files that change in place (names each on stderr)")
    mode.add_argument("--check", action="store_true",
                      help="write nothing; name each file that is not formatted (FILE: not "
                           "formatted, on stderr) and exit 1 if there is one")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    status = 0
    for path in map(Path, args.files):
        text, diags = read_text(path)
        errors = [d for d in diags if d.severity == "error"]
        if text is None or errors:
            print(RecipeError(errors or diags).format(), file=sys.stderr)
            status = 1
            continue
        try:
            formatted = lang.format_text(text, str(path))
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
                problem = rewrite(path, text.encode("utf-8"), formatted)
                if problem:
                    print(f"{path}: {problem}", file=sys.stderr)
                    status = 1
                else:
                    print(f"formatted {path}", file=sys.stderr)
        else:
            sys.stdout.write(formatted)
    return status


# --------------------------------------------------------------------------
# Writing a file back.
#
# How: the file a path names is its symlink target (the link stays a link). When
# renaming a new file over it keeps everything another program could see (one
# link, no extended attributes such as ACLs, an owner and group this process can
# give the new file), the new text goes to a temporary file in the same
# directory, gets the old owner and mode, and `os.replace` swaps it in: the file
# is either the old text or the new, never half written. Otherwise (a hard-linked
# file, ACLs or other xattrs, a file owned by someone else that we may write, a
# directory we cannot write) the text is written into the same inode instead
# (pwrite from offset 0, then truncate, then fsync), which keeps the links,
# owner, mode and attributes; a crash in that short window can leave the file
# partly written, the price of keeping the links. Either way, just before
# replacing, the file is read again and compared with what was formatted; if it
# changed (someone appended meanwhile), it is not written. A race within the few
# microseconds between that comparison and the replace is not detected.
#
# Permissions: a file with no write bit for anyone is read-only for fmt, also
# for root (who could write it anyway): `chmod a-w` is a statement that the file
# should not change; otherwise os.access decides, as the kernel would.

CHANGED = "changed while formatting; not written"


def rewrite(path: str | os.PathLike, expected: bytes, text: str) -> str | None:
    """Replace the file at ``path`` (through symlinks), whose content was ``expected``,
    by ``text``. None on success, else the reason it was not written."""
    target = os.path.realpath(path)
    try:
        st = os.stat(target)
    except OSError as e:
        return f"cannot write: {e.strerror or e}; not written"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file; not written"
    if st.st_mode & 0o222 == 0 or not os.access(target, os.W_OK):
        return f"read-only file (mode {stat.S_IMODE(st.st_mode):04o}); not written"
    data = text.encode("utf-8")
    try:
        if _rename_keeps_everything(target, st):
            done = _replace_by_rename(target, st, expected, data)
            if done is not _FALLBACK:
                return done
        return _write_in_place(target, st, expected, data)
    except OSError as e:  # EROFS, ENOSPC, EIO ...: this file fails, the next ones go on
        return f"cannot write: {e.strerror or e}; not written"


_FALLBACK = object()  # the directory refused a temporary file: write in place


def _rename_keeps_everything(target: str, st: os.stat_result) -> bool:
    if st.st_nlink != 1:
        return False
    try:
        if os.listxattr(target):
            return False
    except OSError:
        pass  # no extended attributes on this filesystem: nothing to lose
    euid = os.geteuid()
    return euid == 0 or (st.st_uid == euid and st.st_gid in {os.getegid(), *os.getgroups()})


def _replace_by_rename(target: str, st: os.stat_result, expected: bytes, data: bytes):
    folder, name = os.path.split(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".qdsl-fmt", dir=folder)
    except OSError:
        return _FALLBACK
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                try:
                    os.fchown(f.fileno(), st.st_uid, st.st_gid)
                except PermissionError:  # e.g. root in a user namespace: keep the owner
                    os.unlink(tmp)       # by writing in place instead
                    return _FALLBACK
            os.fchmod(f.fileno(), stat.S_IMODE(st.st_mode))  # after chown, which clears setuid
            os.fsync(f.fileno())
        if _content(target, st) != expected:
            os.unlink(tmp)
            return CHANGED
        os.replace(tmp, target)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    return None


def _write_in_place(target: str, st: os.stat_result, expected: bytes, data: bytes) -> str | None:
    fd = os.open(target, os.O_RDWR | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) or _read_all(fd) != expected:
            return CHANGED
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], done)
        os.ftruncate(fd, len(data))
        os.fsync(fd)
    finally:
        os.close(fd)
    return None


def _content(target: str, st: os.stat_result) -> bytes | None:
    """The file's bytes now, or None if it is no longer the file that was read."""
    fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        now = os.fstat(fd)
        return _read_all(fd) if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino) else None
    finally:
        os.close(fd)


def _read_all(fd: int) -> bytes:
    chunks, size = [], 0
    while size <= MAX_FILE_BYTES:
        chunk = os.pread(fd, MAX_FILE_BYTES + 1 - size, size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)
