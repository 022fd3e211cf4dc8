"""The installed console script, run as a user would (a fresh interpreter)."""

import subprocess
import sys

from qdsl.cli.names import COMMANDS


def _qdsl(*args):
    return subprocess.run([sys.executable, "-m", "qdsl.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_help_lists_every_available_command():
    r = _qdsl("--help")
    assert r.returncode == 0
    for name in ("check", "fmt", "explain"):
        assert name in r.stdout and COMMANDS[name] in r.stdout


def test_check_error_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.qrec"
    bad.write_text("mlp.c_fc -> w8 per_grop(K=8)\n")
    r = _qdsl("check", str(bad))
    assert r.returncode == 1
    assert f"{bad}:1:16: error: unknown option `per_grop`" in r.stderr + r.stdout
    assert "Traceback" not in r.stderr


def _failing_command(exc):
    def func(args):
        raise exc
    return func


def _run_main_with(monkeypatch, capsys, exc, argv=("check", "x.qrec")):
    """qdsl.cli.main with the command replaced by one that raises ``exc``."""
    import qdsl.cli.app as cli
    import qdsl.cli.commands.check as check

    monkeypatch.setattr(check, "run", _failing_command(exc))
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


def test_unexpected_exception_is_one_line_internal_error(monkeypatch, capsys):
    code, err = _run_main_with(monkeypatch, capsys, ValueError("boom"))
    assert code == 3 and "Traceback" not in err
    assert err.strip() == ("internal error: ValueError: boom (a bug in qdsl; rerun with -v "
                           "for the traceback and report it)")


def test_unexpected_exception_traceback_with_verbose(monkeypatch, capsys):
    code, err = _run_main_with(monkeypatch, capsys, ValueError("boom"), ("-v", "check", "x"))
    assert code == 3 and "Traceback" in err and "internal error" in err


def test_os_error_names_the_file(monkeypatch, capsys):
    import errno

    exc = OSError(errno.EROFS, "Read-only file system", "/ro/out")
    code, err = _run_main_with(monkeypatch, capsys, exc)
    assert code == 2 and err.strip() == "error: /ro/out: Read-only file system"


def test_sigterm_runs_cleanup_and_exits_143(tmp_path):
    """SIGTERM raises KeyboardInterrupt in the command, so its cleanup runs."""
    script = tmp_path / "t.py"
    marker = tmp_path / "cleaned"
    script.write_text(f"""
import os, signal, sys, time
import qdsl.cli as cli
import qdsl.cli.commands.check as check
def func(args):
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
    finally:
        open({str(marker)!r}, "w").close()
check.run = func
sys.exit(cli.main(["check", "x.qrec"]))
""")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 143 and marker.exists() and "interrupted" in r.stderr
