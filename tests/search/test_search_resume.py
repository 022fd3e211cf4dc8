"""qdsl search end to end on a saved tiny GPT-2: an interrupted search resumes from its
saved state and finds what an uninterrupted one finds; the measured loss in the header
is what ``qdsl eval`` reports for the compiled recipe."""

from __future__ import annotations

import json
import math

import pytest

from qdsl import cli
from qdsl.search import sensitivity
from qdsl.search.state import state_paths


def _args(root, out, *extra):
    return ["search", "--model", str(root / "model"), "--budget", "6",
            "--candidates", "w8a8; w4a8 group(16); skip", "--calib", str(root / "code"),
            "--samples", "12", "--seq-len", "16", "--batch", "4", "--check", "3",
            "--check-windows", "4", "--measure-bench", str(root / "code"),
            "--measure-windows", "3", "-o", str(out), "--report", str(out) + ".json", *extra]


def _body(path) -> tuple[list[str], list[str]]:
    """(header lines but the timing, rules) of a written recipe."""
    lines = path.read_text().splitlines()
    head = [x for x in lines if x.startswith("#") and not x.startswith("# Search:")]
    return head, [x for x in lines if x and not x.startswith("#")]


def _report(path) -> dict:
    r = json.loads(path.read_text())
    r["measured"].pop("seconds")
    return {k: r[k] for k in ("found", "sensitivity", "measured", "budget")}


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """An uninterrupted search: its recipe and report."""
    out = tiny_dir / "ref.qrec"
    assert cli.main(_args(tiny_dir, out)) == 0
    return out


def _interrupt_at(monkeypatch, call: int):
    """Ctrl-C in the ``call``-th loss computed (scoring: one per batch; check: the float
    loss, then one per pair and batch of check windows)."""
    real, n = sensitivity._loss, [0]

    def loss(gm, ids):
        n[0] += 1
        if n[0] == call:
            raise KeyboardInterrupt
        return real(gm, ids)
    monkeypatch.setattr(sensitivity, "_loss", loss)


@pytest.mark.slow
@pytest.mark.parametrize("call, stage, reused", [
    (2, "score", "1 scored batch(es) reused"),               # after batch 1 of 3
    (6, "scored", "every score reused (12 windows), 1 check pair(s) reused"),  # 3 + base + 1
])
def test_interrupted_search_resumes_to_the_uninterrupted_result(
        tiny_dir, reference, monkeypatch, capsys, call, stage, reused):
    out = tiny_dir / f"cut{call}.qrec"
    js, st = state_paths(out)
    with monkeypatch.context() as m:
        _interrupt_at(m, call)
        assert cli.main(_args(tiny_dir, out)) == 130
    assert not out.exists() and js.exists()
    saved = json.loads(js.read_text())
    assert saved["stage"] == stage and st.exists() == (stage == "score")
    capsys.readouterr()
    assert cli.main(_args(tiny_dir, out)) == 0
    err = capsys.readouterr().err
    assert f"resuming from {js}: {reused}" in err
    assert not js.exists() and not st.exists()          # deleted once the recipe is written
    assert _body(out) == _body(reference)
    assert _report(out.with_name(out.name + ".json")) == _report(
        reference.with_name(reference.name + ".json"))
    assert "resumed a saved state" in out.read_text()


@pytest.mark.slow
def test_a_state_of_other_arguments_is_ignored_with_a_notice(tiny_dir, monkeypatch, capsys):
    out = tiny_dir / "other.qrec"
    js, _ = state_paths(out)
    with monkeypatch.context() as m:
        _interrupt_at(m, 2)
        assert cli.main(_args(tiny_dir, out)) == 130
    capsys.readouterr()
    args = _args(tiny_dir, out)
    args[args.index("--samples") + 1] = "8"
    assert cli.main(args + ["--no-measure"]) == 0
    err = capsys.readouterr().err
    notice = [x for x in err.splitlines() if x.startswith("ignoring")]
    assert notice == [f"ignoring {js}: made with other arguments (samples, windows); "
                      "starting afresh"]
    assert "resuming" not in err and not js.exists()
    assert "# Measured: not measured (--no-measure)." in out.read_text()


@pytest.mark.slow
def test_a_damaged_state_is_ignored(tiny_dir, monkeypatch, capsys):
    out = tiny_dir / "bad.qrec"
    js, st = state_paths(out)
    with monkeypatch.context() as m:
        _interrupt_at(m, 3)
        assert cli.main(_args(tiny_dir, out)) == 130
    data = json.loads(js.read_text())
    data["step"] += 1           # as if cut between writing the tensors and the JSON
    js.write_text(json.dumps(data))
    capsys.readouterr()
    assert cli.main(_args(tiny_dir, out, "--no-measure")) == 0
    err = capsys.readouterr().err
    assert f"ignoring {js}: {st.name} is from another save" in err


@pytest.mark.slow
def test_measured_loss_is_what_qdsl_eval_reports_for_the_compiled_recipe(tiny_dir, reference):
    rep = json.loads(reference.with_name(reference.name + ".json").read_text())
    m = rep["measured"]
    assert m["windows"] == 3 and m["loss"] > 0 and len(m["window_nll"]) == 3
    art, ev = tiny_dir / "ref_art", tiny_dir / "ref_eval.json"
    assert cli.main(["compile", str(reference), "--model", str(tiny_dir / "model"),
                     "--calib", str(tiny_dir / "code"), "--samples", "12", "--seq-len", "16",
                     "--seed", "0", "-o", str(art)]) == 0
    assert cli.main(["eval", str(art), "--bench", str(tiny_dir / "code"), "--n", "3",
                     "--seed", "0", "--ppl-windows", "3", "--max-new-tokens", "4",
                     "--no-progress", "--json", str(ev)]) == 0
    got = json.loads(ev.read_text())
    # the artifact's figure: the same windows, the same code path, the same numbers
    assert got["target"]["ppl_window_nll"] == m["window_nll"]
    assert got["target"]["ppl"] == pytest.approx(math.exp(m["loss"]), rel=1e-12)
    # the float model (eval runs it 8 windows per forward: equal up to summation order)
    assert got["baseline"]["ppl"] == pytest.approx(math.exp(m["float_loss"]), rel=1e-4)
    header = reference.read_text()
    assert f"# Measured: {m['loss']:.4f} nats/token (float {m['float_loss']:.4f}" in header


def test_a_bad_measure_bench_is_refused_before_any_model_work(tmp_path, capsys):
    code = cli.main(["search", "--model", "no-such-model", "--budget", "6", "--candidates",
                     "w8a8", "--measure-bench", str(tmp_path / "nope"),
                     "-o", str(tmp_path / "f.qrec")])
    err = capsys.readouterr().err
    assert code == 2 and "nope: not 'stdlib', a directory of .py files" in err
    assert "Traceback" not in err and "no-such-model" not in err
