"""`qdsl fmt --write` never loses data: permissions, links, owner, concurrent changes,
write failures (one error per file, the other files still done, exit 1)."""

from __future__ import annotations

import errno
import os
import stat

import pytest

import qdsl.lang
from qdsl.cli import main

UGLY = "* -> w8a8\nblock.*.res_sum->a16\n"
PRETTY = "*               -> w8a8\nblock.*.res_sum -> a16\n"


@pytest.fixture
def ugly(tmp_path):
    def make(name: str = "r.qrec"):
        p = tmp_path / name
        p.write_text(UGLY)
        return p
    return make


def _fmt_write(capsys, *paths) -> tuple[int, str]:
    code = main(["fmt", "--write", *map(str, paths)])
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err
    return code, err


def test_read_only_file_is_not_written_and_the_others_are(ugly, capsys):
    ro, ok = ugly("ro.qrec"), ugly("ok.qrec")
    ro.chmod(0o444)  # root can write it anyway: fmt refuses on the mode bits
    code, err = _fmt_write(capsys, ro, ok)
    assert code == 1
    assert f"{ro}: read-only file (mode 0444); not written" in err
    assert ro.read_text() == UGLY and stat.S_IMODE(ro.stat().st_mode) == 0o444
    assert ok.read_text() == PRETTY and f"formatted {ok}" in err


def test_symlink_is_written_through(ugly, capsys, tmp_path):
    target = ugly("target.qrec")
    link = tmp_path / "link.qrec"
    link.symlink_to(target.name)
    assert _fmt_write(capsys, link)[0] == 0
    assert link.is_symlink() and os.readlink(link) == "target.qrec"
    assert target.read_text() == PRETTY


def test_hard_links_are_kept(ugly, capsys, tmp_path):
    a = ugly("a.qrec")
    b = tmp_path / "b.qrec"
    os.link(a, b)
    ino = a.stat().st_ino
    assert _fmt_write(capsys, a)[0] == 0
    assert b.read_text() == PRETTY and a.stat().st_ino == ino and a.stat().st_nlink == 2


@pytest.mark.parametrize("how", ["renamed", "in-place", "chown-refused"])
def test_mode_and_owner_are_kept(ugly, capsys, tmp_path, monkeypatch, how):
    if os.geteuid() != 0:
        pytest.skip("giving a file to another owner needs root (CI runs as root)")
    p = ugly()
    if how == "in-place":
        os.link(p, tmp_path / "other.qrec")
    if how == "chown-refused":  # root in a user namespace: the temp file cannot be given away
        def refuse(*_):
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))
        monkeypatch.setattr(os, "fchown", refuse)
    os.chown(p, 12345, 23456)
    p.chmod(0o640)
    assert _fmt_write(capsys, p)[0] == 0
    st = p.stat()
    assert p.read_text() == PRETTY
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (12345, 23456, 0o640)
    assert [q.name for q in tmp_path.iterdir() if q.name.startswith(".")] == []


@pytest.mark.parametrize("linked", [False, True], ids=["renamed", "in-place"])
def test_change_during_formatting_is_not_lost(ugly, capsys, tmp_path, monkeypatch, linked):
    p = ugly()
    if linked:
        os.link(p, tmp_path / "other.qrec")
    real = qdsl.lang.format_text

    def format_while_someone_appends(text, file="<string>"):
        out = real(text, file)
        with open(p, "a") as f:
            f.write("lm_head -> skip\n")
        return out
    monkeypatch.setattr(qdsl.lang, "format_text", format_while_someone_appends)
    code, err = _fmt_write(capsys, p)
    assert code == 1 and f"{p}: changed while formatting; not written" in err
    assert p.read_text() == UGLY + "lm_head -> skip\n"
    assert [q.name for q in tmp_path.iterdir() if q.name.startswith(".")] == []


def test_read_only_filesystem_is_one_error_per_file(ugly, capsys, tmp_path, monkeypatch):
    ro_dir = tmp_path / "ro"
    ro_dir.mkdir()
    bad, ok = ugly("ro/r.qrec"), ugly("ok.qrec")
    real_open = os.open

    def erofs_open(path, flags, *args, **kwargs):
        writing = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if writing and os.path.dirname(os.path.realpath(path)) == str(ro_dir):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real_open(path, flags, *args, **kwargs)
    monkeypatch.setattr(os, "open", erofs_open)
    code, err = _fmt_write(capsys, bad, ok)
    assert code == 1
    assert f"{bad}: cannot write: Read-only file system; not written" in err
    assert bad.read_text() == UGLY and ok.read_text() == PRETTY


def test_write_failure_during_replace_keeps_the_file(ugly, capsys, tmp_path, monkeypatch):
    p, ok = ugly(), ugly("ok.qrec")
    real_replace = os.replace

    def failing_replace(src, dst, *a, **k):
        if os.path.realpath(dst) == str(p):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_replace(src, dst, *a, **k)
    monkeypatch.setattr(os, "replace", failing_replace)
    code, err = _fmt_write(capsys, p, ok)
    assert code == 1 and f"{p}: cannot write: Input/output error; not written" in err
    assert p.read_text() == UGLY and ok.read_text() == PRETTY
    assert [q.name for q in tmp_path.iterdir() if q.name.startswith(".")] == []


def test_check_names_unformatted_files_as_its_help_says(ugly, capsys):
    p = ugly()
    assert main(["fmt", "--check", str(p)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == f"{p}: not formatted\n" and p.read_text() == UGLY
    with pytest.raises(SystemExit):
        main(["fmt", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "name each file that is not formatted (FILE: not formatted, on stderr)" in help_text
    assert "print nothing" not in help_text
