"""The installed console script, run as a user would (a fresh interpreter)."""

import subprocess
import sys

from qdsl.cli import COMMANDS


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
