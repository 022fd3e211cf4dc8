"""Which files a recipe may read: includes name .qrec regular files only; every file
read is capped and checked before it is opened; nothing else's content is echoed."""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager

import pytest

from qdsl.cli import main
from qdsl.errors import RecipeError
from qdsl.lang import check_file, load_recipe
from qdsl.lang.loader import MAX_FILE_BYTES, MAX_INCLUDE_DEPTH


@contextmanager
def no_hang(seconds: int = 5):
    """Fail instead of hanging (opening a FIFO for reading blocks until a writer comes)."""
    def boom(*_):
        raise TimeoutError("blocked: the file was opened")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _one_error(path) -> str:
    with no_hang():
        diags = check_file(path)
    assert len(diags) == 1, [d.format() for d in diags]
    return diags[0].format()


def test_include_etc_passwd_is_one_line_without_content(tmp_path):
    (tmp_path / "a.qrec").write_text('* -> w8\ninclude "/etc/passwd"\n')
    shown = _one_error(tmp_path / "a.qrec")
    assert "2:10: error: not a recipe file: `/etc/passwd`" in shown
    assert "only .qrec files can be included" in shown and "root:" not in shown


def test_include_proc_environ_does_not_print_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("QDSL_TEST_SECRET", "hunter2-secret-value")
    (tmp_path / "a.qrec").write_text('include "/proc/self/environ"\n')
    shown = _one_error(tmp_path / "a.qrec")
    assert "not a recipe file" in shown and "hunter2" not in shown


def test_include_symlink_named_qrec_to_another_file(tmp_path):
    (tmp_path / "secret.txt").write_text("password = hunter2\n")
    (tmp_path / "x.qrec").symlink_to(tmp_path / "secret.txt")
    (tmp_path / "a.qrec").write_text('include "x.qrec"\n')
    shown = _one_error(tmp_path / "a.qrec")
    assert "`x.qrec` is a link to a file not named *.qrec" in shown and "hunter2" not in shown
    # a link to a .qrec file is fine
    (tmp_path / "real.qrec").write_text("* -> w8\n")
    (tmp_path / "y.qrec").symlink_to(tmp_path / "real.qrec")
    (tmp_path / "b.qrec").write_text('include "y.qrec"\n')
    assert load_recipe(tmp_path / "b.qrec").rules[0].weight.bits == 8


def test_include_fifo_is_refused_without_opening_it(tmp_path):
    os.mkfifo(tmp_path / "f.qrec")
    (tmp_path / "a.qrec").write_text('include "f.qrec"\n')
    shown = _one_error(tmp_path / "a.qrec")
    assert "cannot include `f.qrec`: not a recipe file (a FIFO)" in shown


def test_include_directory_and_device(tmp_path):
    (tmp_path / "d.qrec").mkdir()
    (tmp_path / "dev.qrec").symlink_to("/dev/zero")
    (tmp_path / "a.qrec").write_text('include "d.qrec"\ninclude "dev.qrec"\n')
    with no_hang():
        d1, d2 = check_file(tmp_path / "a.qrec")
    assert d1.message == "cannot include `d.qrec`: not a recipe file (a directory)"
    assert d2.message.startswith("not a recipe file: `dev.qrec` is a link")


def test_include_binary_recipe_file(tmp_path):
    (tmp_path / "b.qrec").write_bytes(b"* -> w8\nkey=\xff\xfe secret\n")
    (tmp_path / "a.qrec").write_text('include "b.qrec"\n')
    shown = _one_error(tmp_path / "a.qrec")
    assert "cannot include `b.qrec`: not a recipe file (binary): invalid UTF-8 byte 0xff " \
           "(byte offset 12) (line 2, column 5)" in shown and "secret" not in shown


@pytest.mark.parametrize("make, expect", [
    (lambda p: os.mkfifo(p), "not a recipe file (a FIFO)"),
    (lambda p: p.symlink_to("/dev/zero"), "not a recipe file (a character device)"),
    (lambda p: p.mkdir(), "not a recipe file (a directory)"),
    (lambda p: p.touch() or os.truncate(p, MAX_FILE_BYTES + 1),
     f"larger than {MAX_FILE_BYTES} bytes"),
    (lambda p: p.write_bytes(b"\x7fELF\x02\x01\x01\x00" + b"\x00" * 64),
     "not a recipe file (binary): it holds a NUL byte"),
])
def test_top_level_file_that_is_not_a_recipe(tmp_path, capsys, make, expect):
    path = tmp_path / "r.qrec"
    make(path)
    t0 = time.perf_counter()
    assert expect in _one_error(path)
    for cmd in (["check", str(path)], ["fmt", str(path)], ["fmt", "--write", str(path)]):
        with no_hang():
            assert main(cmd) == 1
        err = capsys.readouterr().err
        assert expect in err and "Traceback" not in err and err.count("\n") <= 2
    with pytest.raises(RecipeError, match="not a recipe file|larger than"):
        load_recipe(path)
    assert time.perf_counter() - t0 < 5


def test_include_depth_is_capped(tmp_path):
    n = MAX_INCLUDE_DEPTH + 5
    for i in range(n):
        (tmp_path / f"f{i}.qrec").write_text(f'include "f{i + 1}.qrec"\n')
    (tmp_path / f"f{n}.qrec").write_text("* -> w8\n")
    (d,) = check_file(tmp_path / "f0.qrec")
    assert d.message == f"includes nested more than {MAX_INCLUDE_DEPTH} deep"
    assert d.file.endswith(f"f{MAX_INCLUDE_DEPTH - 1}.qrec")


def test_include_bomb_is_capped_and_fast(tmp_path):
    # each file includes the next one twice: 2**20 splices without a cap
    for i in range(20):
        (tmp_path / f"f{i}.qrec").write_text(f'include "f{i + 1}.qrec"\n' * 2)
    (tmp_path / "f20.qrec").write_text("* -> w8\n")
    t0 = time.perf_counter()
    diags = check_file(tmp_path / "f0.qrec")
    assert time.perf_counter() - t0 < 5
    assert any("files included in one recipe" in d.message for d in diags)
    with pytest.raises(RecipeError):
        load_recipe(tmp_path / "f0.qrec")
