"""qdsl.progress: live bars, nothing, or labelled lines for work sharing a terminal."""

from __future__ import annotations

import io

from qdsl.progress import _Lines, bar, live
from qdsl.study.jobs import HUMANEVAL, Job


def _lines(monkeypatch, **kw) -> list[str]:
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    for _ in bar(range(5), desc="completions", unit="sample", **kw):
        pass
    text = out.getvalue()
    assert "\r" not in text and text.endswith("\n")
    return text.splitlines()


def test_line_mode_writes_labelled_lines_at_start_and_end(monkeypatch):
    lines = _lines(monkeypatch, progress="[wei/t5_w4a8]")
    # a fast loop: the start and the end only (at most one line a minute between)
    assert len(lines) == 2
    assert all(line.startswith("[wei/t5_w4a8] completions: ") for line in lines)
    assert "0/5" in lines[0] and "5/5" in lines[-1] and "sample/s" in lines[-1]


def test_line_mode_with_a_short_interval_writes_a_line_per_step(monkeypatch):
    lines = _lines(monkeypatch, progress="[j]", interval=0)
    counts = [line.split()[2] for line in lines]   # the end may repeat with a later rate
    assert list(dict.fromkeys(counts)) == [f"{i}/5" for i in range(6)]


def test_line_mode_ends_with_a_line_even_when_a_live_bar_would_not_stay(monkeypatch):
    lines = _lines(monkeypatch, progress="[j]", leave=False)
    assert "5/5" in lines[-1]


def test_no_progress_writes_nothing(monkeypatch, capsys):
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    assert list(bar(range(3), desc="x", progress=False)) == [0, 1, 2]
    assert out.getvalue() == "" and capsys.readouterr().err == ""


def test_lines_ignore_tqdm_clearing_writes():
    out = io.StringIO()
    f = _Lines("[j]", out)
    f.write("\r")
    f.write("\r     \r")
    f.write("\rx: 1/2\n")
    assert out.getvalue() == "[j] x: 1/2\n"


def test_job_labels_name_the_recipe_and_what_runs():
    assert Job(None).label == "[fp32]"
    assert Job("/r/recipes/storti/t2_w8a32.qrec").label == "[storti/t2_w8a32]"
    assert Job("/r/recipes/wei/t4_static_per_tensor.qrec", HUMANEVAL).label == \
        "[wei/t4_static_per_tensor humaneval]"
    assert Job("/r/x/w8a8.qrec", lower="int8").label == "[x/w8a8 --lower int8]"


def test_postfix_shows_in_lines(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    with bar(total=2, desc="complete", progress="[j]", postfix={"batch": 8}) as b:
        b.update(2)
    assert "batch=8" in out.getvalue().splitlines()[-1]


def test_live_is_false_off_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert live() is False
