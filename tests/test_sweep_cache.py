"""The sweep cache read back (qdsl.study.sweepcache) and standard JSON everywhere: an unusable
cache entry is named and its job runs again (``--report``: its rows show as not run);
NaN / Infinity are written as null and every reader copes with null. The jobs are
faked (``sweepjob.run_job``): these tests are about the files, not the models."""

from __future__ import annotations

import json
import logging
import math
import shutil

import pytest

from qdsl.study import sweepjob
from qdsl.atomic import write_json_atomic
from qdsl.errors import QdslError
from qdsl.study.sweep import SweepConfig, run_sweep
from qdsl.study.sweepcache import BadEntry, check_entry, read_entry
from qdsl.study.jobs import recipe_path
from tiny import tiny

RECIPE = recipe_path("storti/t2_w8a8.qrec")
CODE = "def add(a, b):\n    s = a + b\n    return s\n\n\nclass P:\n    x = 1\n    y = 2\n"


def _strict(text: str):
    def refuse(c):
        raise ValueError(f"non-standard JSON constant {c}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    tiny("gpt2").save_pretrained(root / "model")
    (root / "code").mkdir()
    for i in range(3):
        (root / "code" / f"m{i}.py").write_text(CODE * 4)
    return root


def _cfg(root) -> SweepConfig:
    return SweepConfig(model=str(root / "model"), bench=str(root / "code"), n=2)


def _fake(calls: list, es_of_recipe: float = float("nan")):
    """A job result as run_job makes it; the recipe's ES is NaN (an empty measurement)
    and every perplexity infinite."""
    def run_job(job, cfg, samples, out_dir, *, progress=False, artifact=None, **_):
        calls.append(job)
        es = 50.0 if job.recipe is None else es_of_recipe
        return {"kind": job.kind, "recipe": job.recipe, "model": "tiny",
                "bits": "fp32" if job.recipe is None else "W8A8", "n": 2, "es": es,
                "em": 0.0 if es == es else float("nan"), "ppl": float("inf"),
                "bpb": float("-inf"), "compression": 1.0, "size_mb": 0.1, "seconds": 1.5,
                "samples": [{"id": "m0.py:2", "pred": "", "em": 0.0, "es": 40.0}]}
    return run_job


@pytest.fixture(scope="module")
def swept(dirs, tmp_path_factory):
    """A finished two-job sweep (baseline + one recipe), made with the fake jobs."""
    mp = pytest.MonkeyPatch()
    calls: list = []
    mp.setattr(sweepjob, "run_job", _fake(calls))
    out = tmp_path_factory.mktemp("swept") / "s"
    res = run_sweep(_cfg(dirs), out, recipes=[RECIPE], progress=False)
    mp.undo()
    assert len(calls) == 2 and not res["failed"]
    return out


def _entries(out) -> dict:
    return {json.loads(p.read_text())["recipe"]: p for p in (out / "cache").glob("*.json")}


def test_nan_and_infinity_are_written_as_null_and_read_back(swept, dirs, monkeypatch):
    for p in list((swept / "cache").glob("*.json")) + [swept / "results.json"]:
        _strict(p.read_text())   # standard JSON: no NaN / Infinity tokens
    res = _strict((swept / "results.json").read_text())
    rows = {r["recipe"]: r for r in res["tables"]["recipes"]}
    assert rows[RECIPE]["es"] is None and rows[None]["ppl"] is None and rows[None]["es"] == 50
    assert "| t2_w8a8 | W8A8 | - | - | - | 1.00x / - |" in (swept / "tables.md").read_text()
    # an entry with null in it is a finished job: a re-run runs nothing
    calls: list = []
    monkeypatch.setattr(sweepjob, "run_job", _fake(calls))
    run_sweep(_cfg(dirs), swept, recipes=[RECIPE], progress=False)
    assert calls == []


CORRUPT = {
    "not JSON": lambda e: '{"kind": "quality", "es": ',
    "a list": lambda e: "[]",
    "null": lambda e: "null",
    "es is a string": lambda e: json.dumps({**e, "es": "high"}),
    "no samples": lambda e: json.dumps({k: v for k, v in e.items() if k != "samples"}),
    "a sample without id": lambda e: json.dumps({**e, "samples": [{"es": 1.0}]}),
    "another job's key": lambda e: json.dumps({**e, "key": "0123456789abcdef"}),
    "a robust job": lambda e: json.dumps({**e, "kind": "robust"}),
    "not UTF-8": lambda e: b"\xff\xfe{",
}


@pytest.mark.parametrize("case", CORRUPT)
def test_an_unusable_entry_is_named_and_its_job_runs_again(swept, dirs, tmp_path, monkeypatch,
                                                           caplog, case):
    out = tmp_path / "s"
    shutil.copytree(swept, out)
    bad = _entries(out)[None]
    data = CORRUPT[case](json.loads(bad.read_text()))
    bad.write_bytes(data if isinstance(data, bytes) else data.encode())
    calls: list = []
    monkeypatch.setattr(sweepjob, "run_job", _fake(calls, 60.0))
    with caplog.at_level(logging.WARNING):
        res = run_sweep(_cfg(dirs), out, recipes=[RECIPE], progress=False)
    assert [j.recipe for j in calls] == [None]   # only the bad entry's job
    msg = [r.getMessage() for r in caplog.records if str(bad) in r.getMessage()]
    assert len(msg) == 1 and "unusable" in msg[0] and "running its job again" in msg[0]
    assert read_entry(bad)["es"] == 50.0 and res["tables"]["recipes"][0]["es"] == 50.0


def test_report_mode_names_the_entry_and_shows_its_row_as_not_run(swept, dirs, tmp_path,
                                                                  monkeypatch, caplog):
    from qdsl.cli import main

    out = tmp_path / "s"
    shutil.copytree(swept, out)
    bad = _entries(out)[None]
    bad.write_text('{"kind": "quality"}')
    calls: list = []
    monkeypatch.setattr(sweepjob, "run_job", _fake(calls))
    with caplog.at_level(logging.WARNING):
        code = main(["sweep", RECIPE, "--model", str(dirs / "model"), "--bench",
                     str(dirs / "code"), "--n", "2", "-o", str(out), "--report",
                     "--no-progress"])
    assert code == 0 and calls == []
    msg = [r.getMessage() for r in caplog.records if str(bad) in r.getMessage()]
    assert len(msg) == 1 and "no 'recipe'" in msg[0] and "rows show as not run" in msg[0]
    assert "| Baseline (fp32) | - | (not run yet) |" in (out / "tables.md").read_text()


def test_older_caches_with_nan_are_read_as_null(swept, dirs, tmp_path):
    out = tmp_path / "s"
    shutil.copytree(swept, out)
    p = _entries(out)[RECIPE]
    p.write_text(p.read_text().replace('"es": null', '"es": NaN').replace('"ppl": null',
                                                                           '"ppl": Infinity'))
    assert "NaN" in p.read_text()
    entry = read_entry(p)
    assert entry["es"] is None and entry["ppl"] is None
    res = run_sweep(_cfg(dirs), out, recipes=[RECIPE], progress=False, only_report=True)
    assert res["tables"]["recipes"][1]["es"] is None
    _strict((out / "results.json").read_text())


@pytest.mark.parametrize("entry, problem", [
    ({"kind": "quality", "recipe": None, "bits": "fp32", "n": True, "es": 1, "em": 1,
      "samples": []}, "'n' is true, not an integer"),
    ({"kind": "robust", "recipe": None, "bits": "fp32",
      "robust": {"n": 2, "es": 1, "es_perturbed": 1, "em": 1, "em_perturbed": 1,
                 "em_drop_pct": None}}, "no robust.'es_drop_pct'"),
    ({"kind": "robust", "recipe": None, "bits": "fp32",
      "robust": {"n": 2, "es": 1, "es_perturbed": 1, "es_drop_pct": 0, "em": 1,
                 "em_perturbed": 1, "em_drop_pct": None, "perturbed_samples": [3]}},
     r"robust.perturbed_samples\[0\] is not an object"),
    ({"kind": "humaneval", "recipe": "r.qrec", "bits": "W8A8",
      "humaneval": {"pass@1": "0.5", "problems": 2}}, "humaneval.'pass@1' is \"0.5\""),
    ({"kind": "quality", "recipe": None, "bits": "fp32", "n": 2, "es": 1, "em": 1,
      "samples": [], "bench": {"rows": [{"decode_ms": 1}]}}, r"bench.rows\[0\].'kind'"),
    ({"kind": "eval", "recipe": None, "bits": "fp32"}, "unknown kind 'eval'"),
])
def test_check_entry_says_what_is_wrong(entry, problem):
    with pytest.raises(BadEntry, match=problem):
        check_entry(entry)


def test_every_committed_cache_entry_is_usable():
    from pathlib import Path

    files = list((Path(__file__).resolve().parents[1] / "results").glob("*/cache/*.json"))
    for p in files:
        read_entry(p)


def test_write_json_atomic_writes_standard_json(tmp_path):
    """qdsl.atomic's writer (the sweep's cache and reports, eval --json, bench --json)."""
    obj = {"a": math.nan, "b": [math.inf, -math.inf, 1.5, (2.0, math.nan)], "c": {"d": math.nan}}
    write_json_atomic(tmp_path / "x.json", obj)
    assert _strict((tmp_path / "x.json").read_text()) == {
        "a": None, "b": [None, None, 1.5, [2.0, None]], "c": {"d": None}}


def test_report_doc_names_a_corrupt_results_file(swept, tmp_path):
    from qdsl.study.report import update_doc

    out = tmp_path / "s"
    shutil.copytree(swept, out)
    for text, problem in (("{", "not valid JSON"), ("[]", "not a qdsl sweep's results")):
        (out / "results.json").write_text(text)
        with pytest.raises(QdslError, match=f"results.json: {problem}"):
            update_doc(tmp_path / "doc.md", out, "qdsl sweep")
