"""`qdsl check` and `qdsl fmt` through qdsl.cli.main: exit codes, output, no tracebacks."""

from __future__ import annotations

import pytest

from qdsl.cli import main

GOOD = "*               -> w8a8\nblock.*.res_sum -> a16\n"
UGLY = "* -> w8a8\nblock.*.res_sum->a16  # keep\n"


@pytest.fixture
def files(tmp_path):
    paths = {}
    for name, text in {"good": GOOD, "ugly": UGLY, "bad": "* -> w0\nx -> per_chanel\n"}.items():
        paths[name] = tmp_path / f"{name}.qrec"
        paths[name].write_text(text)
    return paths


def test_check_ok(files, capsys):
    assert main(["check", str(files["good"]), str(files["ugly"])]) == 0
    out, err = capsys.readouterr()
    assert out == f"{files['good']}: ok\n{files['ugly']}: ok\n" and err == ""


def test_check_reports_every_error_and_exits_1(files, capsys):
    assert main(["check", str(files["good"]), str(files["bad"])]) == 1
    out, err = capsys.readouterr()
    assert f"{files['bad']}:1:6: error: weight bits must be 1..16" in err
    assert f"{files['bad']}:2:6: error: unknown option `per_chanel`" in err
    assert "hint: did you mean `per_channel`?" in err
    assert f"{files['bad']}: 2 errors" in out and "Traceback" not in out + err


def test_check_missing_file_and_binary(tmp_path, capsys):
    (tmp_path / "bin.qrec").write_bytes(b"\x00\xff\xfe" * 100)
    assert main(["check", str(tmp_path / "nope.qrec"), str(tmp_path / "bin.qrec")]) == 1
    out, err = capsys.readouterr()
    assert "cannot read recipe" in err and "not a recipe file (binary)" in err
    assert "Traceback" not in err and err.count("\n") == 3  # one line each (+ a hint)


def test_check_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["check"])
    assert e.value.code == 2


def test_fmt_prints_canonical(files, capsys):
    assert main(["fmt", str(files["ugly"])]) == 0
    assert capsys.readouterr().out == "*               -> w8a8\nblock.*.res_sum -> a16  # keep\n"


def test_fmt_check_and_write(files, capsys):
    assert main(["fmt", "--check", str(files["good"])]) == 0
    assert main(["fmt", "--check", str(files["ugly"])]) == 1
    assert "not formatted" in capsys.readouterr().err
    assert files["ugly"].read_text() == UGLY  # --check never writes
    assert main(["fmt", "--write", str(files["ugly"])]) == 0
    assert main(["fmt", "--check", str(files["ugly"])]) == 0
    assert [p.name for p in files["ugly"].parent.iterdir() if p.name.startswith(".")] == []


def test_fmt_refuses_files_with_errors(files, capsys):
    assert main(["fmt", "--write", str(files["bad"])]) == 1
    err = capsys.readouterr().err
    assert "error: weight bits" in err and "Traceback" not in err
    assert files["bad"].read_text() == "* -> w0\nx -> per_chanel\n"
