"""Output directories (qdsl.atomic.output_dir): --force replaces only a qdsl artifact,
one writer at a time (refused at once, naming the holder), leftovers of dead writers
are cleaned, the replace never leaves OUT missing, sweep directories are reused only
when they are a sweep's. Pure filesystem, subprocesses for the second writer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from qdsl import atomic
from qdsl.artifact.store import MARKER, write_artifact
from qdsl.atomic import ARTIFACT, SWEEP, atomic_dir, clean_stale, output_dir
from qdsl.errors import ArtifactError, OutputError, QdslError

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "storti" / "t2_w8a8.qrec")


def _artifact(out: Path, value: float = 1.0, *, force: bool = False) -> Path:
    return write_artifact(out, meta={"v": value}, plan={}, recipe_text="* -> w8\n",
                          tensors={"act.x.scale": torch.tensor([value])}, force=force)


def _user_dir(d: Path) -> Path:
    d.mkdir()
    (d / "thesis.tex").write_text("x")
    (d / "chapters").mkdir()
    (d / "chapters" / "one.tex").write_text("y")
    return d


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ------------------------------------------------------------------ what --force replaces


def test_force_refuses_a_directory_that_is_not_an_artifact(tmp_path):
    d = _user_dir(tmp_path / "important")
    with pytest.raises(ArtifactError, match="is not a qdsl artifact .*thesis.tex"):
        _artifact(d, force=True)
    assert (d / "thesis.tex").read_text() == "x" and (d / "chapters" / "one.tex").exists()
    assert _leftovers(tmp_path) == []


def test_force_replaces_an_artifact_and_leaves_nothing_beside_it(tmp_path):
    out = _artifact(tmp_path / "art", 1.0)
    with pytest.raises(ArtifactError, match="exists .*pass --force"):
        _artifact(out, 2.0)
    _artifact(out, 2.0, force=True)
    assert '"v": 2.0' in (out / MARKER).read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]   # no tmp, old or lock
    assert oct(out.stat().st_mode & 0o777) != "0o700"   # as mkdir makes it, not mkdtemp


@pytest.mark.parametrize("case", ["extra file", "extra dir", "symlink inside", "symlink",
                                  "regular file"])
def test_force_refuses_anything_else(tmp_path, case):
    out = tmp_path / "out"
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "data").write_text("mine")
    if case == "symlink":
        out.symlink_to(_artifact(tmp_path / "real"))
    elif case == "regular file":
        out.write_text("mine")
    else:
        _artifact(out)
        if case == "extra file":
            (out / "notes.txt").write_text("mine")
        elif case == "extra dir":
            (out / "model").mkdir()
            (out / "runs").mkdir()
        else:
            (out / "link").symlink_to(keep)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(ArtifactError) as e:
        _artifact(out, 2.0, force=True)
    assert "\n" not in str(e.value)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert (keep / "data").read_text() == "mine"


def test_an_empty_directory_is_used(tmp_path):
    (tmp_path / "out").mkdir()
    _artifact(tmp_path / "out")
    assert (tmp_path / "out" / MARKER).is_file()


def test_the_artifact_marker_is_the_one_qdsl_artifact_writes():
    assert ARTIFACT.marker == MARKER


# ------------------------------------------------------------------ replacing safely


def test_replace_without_an_atomic_swap_keeps_out_on_failure(tmp_path, monkeypatch):
    """Where renameat2 cannot swap: rename away, rename in, and put OUT back when the
    second rename fails; a project error, never a raw OSError."""
    out = _artifact(tmp_path / "art", 1.0)
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    _artifact(out, 2.0, force=True)
    assert '"v": 2.0' in (out / MARKER).read_text() and _leftovers(tmp_path) == []

    real = os.rename

    def second_fails(a, b):
        if Path(a).name.startswith(".art.tmp-"):
            raise OSError(28, "No space left on device")
        return real(a, b)
    monkeypatch.setattr(atomic.os, "rename", second_fails)
    with pytest.raises(ArtifactError, match="cannot write .*No space left"):
        _artifact(out, 3.0, force=True)
    assert '"v": 2.0' in (out / MARKER).read_text() and _leftovers(tmp_path) == []


def test_interrupted_stage_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(tmp_path / "out") as d:
            (d / "half").write_text("x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ stale leftovers


def test_stale_leftovers_of_dead_processes_are_cleaned_live_ones_kept(tmp_path):
    dead, live = _dead_pid(), os.getppid()
    out = _artifact(tmp_path / "out")
    for name in (f".out.tmp-{dead}-abcd1234", f".out.old-{dead}-abcd1234", f".out.old-{dead}",
                 f".out.tmp-{live}-abcd1234", ".other.tmp-1-abcd1234"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x").write_text("x")
    with output_dir(out, force=True):
        pass
    assert _leftovers(tmp_path) == [".other.tmp-1-abcd1234", f".out.tmp-{live}-abcd1234"]


def test_a_replace_cut_off_between_its_renames_is_put_back(tmp_path):
    """A writer killed after moving OUT aside: the next claim restores it."""
    out = _artifact(tmp_path / "art", 1.0)
    os.rename(out, tmp_path / f".art.old-{_dead_pid()}-abcd1234")
    assert clean_stale(out) and '"v": 1.0' in (out / MARKER).read_text()
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------ one writer at a time

HOLDER = """
import sys, time
from qdsl.atomic import ARTIFACT, SWEEP, output_dir
kind = SWEEP if sys.argv[2] == "sweep" else ARTIFACT
with output_dir(sys.argv[1], kind, force=True, reuse=kind is SWEEP) as claim:
    if sys.argv[3] == "stage":
        with claim.stage() as tmp:
            (tmp / "half").write_text("x")
            print("ready", flush=True)
            time.sleep(60)
    print("ready", flush=True)
    time.sleep(60)
"""


def _holder(path: Path, kind: str = "artifact", stage: bool = False) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), kind,
                          "stage" if stage else "claim"], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


@pytest.mark.parametrize("kind", ["artifact", "sweep"])
def test_a_second_writer_is_refused_at_once_naming_the_first(tmp_path, kind):
    out = tmp_path / "out"
    p = _holder(out, kind)
    try:
        t = time.monotonic()
        with pytest.raises(QdslError, match=f"being written by another qdsl process "
                                            f"\\(pid {p.pid}\\)"):
            with output_dir(out, SWEEP if kind == "sweep" else ARTIFACT,
                            reuse=kind == "sweep"):
                pass
        assert time.monotonic() - t < 1.0
    finally:
        p.kill()
        p.wait()
    with output_dir(out, SWEEP if kind == "sweep" else ARTIFACT, reuse=kind == "sweep"):
        pass   # the kernel dropped the dead holder's lock


def test_a_killed_writer_leaves_nothing_that_blocks_the_next(tmp_path):
    out = _artifact(tmp_path / "art", 1.0)
    p = _holder(out, stage=True)
    assert any(n.startswith(".art.tmp-") for n in _leftovers(tmp_path))
    p.send_signal(signal.SIGKILL)
    p.wait()
    _artifact(out, 2.0, force=True)
    assert '"v": 2.0' in (out / MARKER).read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


COMPILE = """
import sys, time
import qdsl.compiler
def slow(*a, **k):
    print("ready", flush=True)
    time.sleep(60)
qdsl.compiler.build.compile = slow
from qdsl.cli import main
sys.exit(main(["compile", sys.argv[2], "--model", "stdlib-gpt2", "-o", sys.argv[1]]))
"""


def test_compile_claims_out_before_working_and_cleans_up_on_sigterm(tmp_path):
    out = tmp_path / "q"
    p = subprocess.Popen([sys.executable, "-c", COMPILE, str(out), RECIPE], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    assert p.stdout.readline().strip() == "ready"   # inside the compile: OUT is locked
    lock = tmp_path / ".q.lock"
    assert lock.read_text().strip() == str(p.pid)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 143 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_cli_compile_force_on_a_user_directory_is_one_line_before_any_work(tmp_path):
    d = _user_dir(tmp_path / "important")
    r = subprocess.run([sys.executable, "-m", "qdsl.cli", "compile", RECIPE, "--model",
                        "stdlib-gpt2", "-o", str(d), "--force"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "is not a qdsl artifact" in r.stderr
    assert (d / "thesis.tex").read_text() == "x"


# ------------------------------------------------------------------ sweep directories


def test_sweep_dir_refuses_a_user_directory_and_reuses_its_own(tmp_path):
    d = _user_dir(tmp_path / "important")
    with pytest.raises(OutputError, match="is not a qdsl sweep directory .*thesis.tex"):
        with output_dir(d, SWEEP, reuse=True):
            pass
    assert sorted(p.name for p in d.iterdir()) == ["chapters", "thesis.tex"]
    s = tmp_path / "s"
    with output_dir(s, SWEEP, reuse=True) as claim:
        (claim.path / "cache").mkdir()
        (claim.path / "notes.md").write_text("mine")   # a sweep dir is never replaced
    with output_dir(s, SWEEP, reuse=True):   # a re-run into its own directory
        pass
    assert (s / "notes.md").read_text() == "mine" and (s / SWEEP.marker).is_file()


def test_sweep_dir_written_before_markers_is_adopted(tmp_path):
    old = tmp_path / "old"
    (old / "cache").mkdir(parents=True)
    (old / "cache" / "abc.json").write_text("{}")
    (old / "results.json").write_text("{}")
    (old / "plots").mkdir()
    with output_dir(old, SWEEP, reuse=True):
        pass
    assert (old / SWEEP.marker).is_file()


def test_sweep_dir_through_a_symlink_is_locked_at_its_target(tmp_path):
    real = tmp_path / "real"
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    real.mkdir()
    with output_dir(tmp_path / "link", SWEEP, reuse=True) as claim:
        assert claim.path == real and (tmp_path / ".real.lock").exists()
