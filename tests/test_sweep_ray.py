"""qdsl sweep's executors: the Ray executor on a local two-CPU cluster started by the
test gives the local executor's results, skips cached jobs on the driver and in the
worker, retries a job whose worker died (leaving no partial entry) and reports one that
fails twice; the cache at an fsspec URL; the clear error without Ray."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest

from qdsl.cli import main
from qdsl.errors import OptionError
from qdsl.study import executors
from qdsl.study.executors import (FAULTS_ENV, MARGIN, RayExecutor, comparable, estimate_memory,
                                  job_memory, make_executor)
from qdsl.study.jobs import Job, recipe_path
from qdsl.study.sweep import run_sweep
from qdsl.study.sweepcache import CacheStore, load_cache
from test_sweep import RECIPES, _cfg, tiny_dir  # noqa: F401 (tiny_dir: a fixture)

TIMEOUT_S = 900   # the whole Ray test, cluster start included (2 busy cores: ~2 min)


@pytest.fixture
def deadline():
    """Fail (instead of hanging CI) if the test runs past ``TIMEOUT_S``."""
    def expire(*_):
        raise TimeoutError(f"Ray sweep test ran past {TIMEOUT_S} s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TIMEOUT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _attempts(faults: Path) -> list[dict]:
    log = faults.with_name("attempts.jsonl")
    return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.slow
def test_ray_sweep_gives_the_local_results(tiny_dir, tmp_path, deadline):  # noqa: F811
    ray = pytest.importorskip("ray", reason="the test extra installs ray (pip install .[test])")
    cfg = _cfg(tiny_dir)
    local = run_sweep(cfg, tmp_path / "local", recipes=RECIPES, progress=False)
    assert not local["failed"], local["failed"]

    faults = tmp_path / "faults" / "faults.json"
    faults.parent.mkdir()
    faults.write_text(json.dumps({"t3_res_sum": "crash-once"}))
    shared = tmp_path / "shared-cache"
    url = f"file://{shared}"
    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {FAULTS_ENV: str(faults)}})
    try:
        out = tmp_path / "ray"
        res = run_sweep(cfg, out, recipes=RECIPES, progress=False, executor="ray", cache=url)
        assert not res["failed"], res["failed"]
        # same results: everything but wall times, timestamps, paths and peak RSS
        assert comparable(res) == comparable(local)
        assert res["tables"]["recipes"][1]["es"] == local["tables"]["recipes"][1]["es"]
        keys = {a["recipe"]: a["key"] for a in _attempts(faults)}
        tries = [a["recipe"] for a in _attempts(faults)]
        assert sorted(tries) == ["fp32", "t2_w8a8", "t3_res_sum", "t3_res_sum"]
        # the killed worker's half-written entry is a temporary, never read as an entry
        assert (shared / f".{keys['t3_res_sum']}.json.dead.tmp").exists()
        entries = sorted(shared.glob("*.json"))
        assert len(entries) == 3 and not (out / "cache").exists()
        for p in entries:
            e = json.loads(p.read_text())
            assert e["peak_rss_bytes"] > 10 * 2**20 and e["peak_rss_scope"] == "job"

        # cached: the driver submits nothing (the report now also shows the seed
        # tables with a finished row in the cache, as a local re-run does)
        again = run_sweep(cfg, out, recipes=RECIPES, progress=False, executor="ray", cache=url)
        assert comparable(again["runs"]) == comparable(res["runs"])
        assert again["tables"]["recipes"] == res["tables"]["recipes"]
        assert len(_attempts(faults)) == 4
        # ... and a worker given a cached job returns the entry without running it
        store = CacheStore(url)
        entry = shared / f"{keys['t2_w8a8']}.json"
        before = entry.stat().st_mtime_ns
        got = []
        RayExecutor().run([(Job(RECIPES[0]), keys["t2_w8a8"], None)], cfg, [], out, store, 1,
                          {}, lambda k, r: got.append((k, r)))
        assert got[0][1]["es"] == json.loads(entry.read_text())["es"]
        assert entry.stat().st_mtime_ns == before and len(_attempts(faults)) == 5

        # a job that raises is retried once, then reported failed; no entry is written
        other = recipe_path("storti/t2_w8a16.qrec")
        faults.write_text(json.dumps({"t2_w8a16": "raise"}))
        bad = run_sweep(cfg, tmp_path / "ray2", recipes=[other], progress=False,
                        executor="ray", cache=url)
        (failure,) = bad["failed"].values()
        assert "retried once" in failure["error"] and "injected failure" in failure["error"]
        assert [a["recipe"] for a in _attempts(faults)].count("t2_w8a16") == 2
        assert len(list(shared.glob("*.json"))) == 3
    finally:
        ray.shutdown()


def test_job_memory_is_the_measured_peak_else_the_estimate(tiny_dir):  # noqa: F811
    model = str(tiny_dir / "model")
    weights = sum(f.stat().st_size for f in (tiny_dir / "model").glob("*.safetensors"))
    assert estimate_memory(model) == int(3.5 * weights + 2**30)
    mem, why = job_memory("quality", {}, model)
    assert mem == estimate_memory(model) and "estimate" in why
    done = {"a": {"kind": "quality", "peak_rss_bytes": 3 << 30},
            "b": {"kind": "quality", "peak_rss_bytes": 2 << 30},
            "c": {"kind": "robust", "peak_rss_bytes": 9 << 30}}
    mem, why = job_memory("quality", done, model)
    assert mem == int((3 << 30) * MARGIN) and "measured" in why


def test_executor_ray_without_ray_is_a_clear_error(tiny_dir, tmp_path, monkeypatch,  # noqa: F811
                                                   capsys):
    monkeypatch.setitem(sys.modules, "ray", None)   # import ray -> ImportError
    with pytest.raises(OptionError, match=r"pip install 'qdsl\[ray\]'"):
        make_executor("ray")
    code = main(["sweep", RECIPES[0], "--model", str(tiny_dir / "model"), "--bench",
                 str(tiny_dir / "code"), "--n", "2", "--executor", "ray", "--no-progress",
                 "-o", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and "qdsl[ray]" in err and "Traceback" not in err
    assert not (tmp_path / "s" / "cache").exists()   # refused before any work
    with pytest.raises(OptionError, match="--address is for --executor ray"):
        make_executor("local", address="auto")
    with pytest.raises(OptionError, match="-j is for the local executor"):
        run_sweep(_cfg(tiny_dir), tmp_path / "j", recipes=RECIPES, jobs=2, executor="ray")


def test_cache_at_a_url_is_written_whole(tmp_path, monkeypatch):
    store = CacheStore(f"file://{tmp_path}/c")
    store.prepare()
    entry = {"kind": "quality", "recipe": None, "bits": "fp32", "n": 1, "es": 1.0,
             "em": float("nan"), "samples": [{"id": "a", "es": 1.0}], "key": "k1"}
    store.write("k1", entry)
    assert store.read("k1", "quality")["em"] is None       # NaN written as null
    assert store.read("k2") is None
    fs, _ = store.fs

    def cut(*a, **k):
        raise OSError("the worker died here")
    monkeypatch.setattr(type(fs), "mv", cut)
    with pytest.raises(OSError):
        store.write("k2", entry)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["k1.json"]
    assert load_cache(store, {"k1": "quality", "k2": "quality"}) == {"k1": store.read("k1")}
    # a store travels to workers as its location alone (Ray pickles it by __reduce__):
    # the constructor and that one argument rebuild a store reading the same entries,
    # with no fsspec filesystem carried along (it is opened again where it is used)
    make, args = store.__reduce__()
    assert make is CacheStore and args == (store.location,)
    again = make(*args)
    assert again._fs is None and repr(again) == repr(store)
    assert again.read("k1", "quality") == store.read("k1", "quality")


def test_comparable_drops_only_the_varying_fields():
    a = {"updated": "x", "runs": {"k": {"es": 1.0, "seconds": 3, "artifact": "/a/x"}}}
    b = {"updated": "y", "runs": {"k": {"es": 1.0, "seconds": 4, "artifact": "/b/x"}}}
    assert comparable(a) == comparable(b)
    b["runs"]["k"]["es"] = 1.5
    assert comparable(a) != comparable(b)
    assert executors.VARYING >= {"wall_seconds_this_run", "peak_rss_bytes"}
