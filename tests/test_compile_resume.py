"""qdsl compile --calib-checkpoint: the CLI hands the file to qdsl.compile (whose resume
is tested in tests/passes/test_calibrate_checkpoint.py) and refuses it with --stream."""

from __future__ import annotations

import qdsl.compiler.build as build
from qdsl.cli.app import main

from test_stream import STATIC, _checkpoint


def test_the_cli_passes_the_checkpoint_to_compile(tmp_path, monkeypatch, capsys):
    d, _ = _checkpoint(tmp_path, "llama")
    seen = {}

    def fake_compile(*a, **kw):
        seen.update(kw)
        raise KeyboardInterrupt   # as if stopped while calibrating

    monkeypatch.setattr(build, "compile", fake_compile)
    ck = tmp_path / "calib.safetensors"
    rc = main(["compile", str(STATIC), "--model", str(d), "--no-stream", "--calib-checkpoint",
               str(ck), "-o", str(tmp_path / "o")])
    assert rc == 130 and "interrupted" in capsys.readouterr().err
    assert seen["calib_checkpoint"] == (str(ck), "qdsl compile")
    seen.clear()
    main(["compile", str(STATIC), "--model", str(d), "--no-stream", "-o", str(tmp_path / "p")])
    assert seen["calib_checkpoint"] is None


def test_calib_checkpoint_is_refused_with_stream(tmp_path, capsys):
    d, _ = _checkpoint(tmp_path, "llama")
    rc = main(["compile", str(STATIC), "--model", str(d), "--stream", "--calib-checkpoint",
               str(tmp_path / "c"), "-o", str(tmp_path / "o")])
    assert rc != 0 and "--calib-checkpoint is for the in-memory compile" in \
        capsys.readouterr().err
