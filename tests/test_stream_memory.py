"""compile --stream's memory: the per-step trace, the heap trim, and when a compile
streams by itself (compiler.autostream)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qdsl.cli.app import main
from qdsl.compiler import memtrace
from qdsl.compiler.stream import compile_stream

from tiny import tiny, tiny_ids

ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "recipes" / "wei" / "t4_static_per_column.qrec"


def _checkpoint(tmp_path: Path, family: str = "llama"):
    m = tiny(family)
    d = tmp_path / family
    m.save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "models" / "stdlib-gpt2" / f, d)
    return d, tiny_ids(m, 3, 12)


def test_trace_names_every_stage_step(tmp_path):
    d, ids = _checkpoint(tmp_path)
    trace = tmp_path / "mem.jsonl"
    compile_stream(d, STATIC, tmp_path / "out", calib=ids, progress=False,
                   trace_memory=trace)
    recs = [json.loads(line) for line in trace.read_text().splitlines()]
    steps = [r["step"] for r in recs]
    for stage in ("embedding", "block 0", "block 1", "head"):
        for what in ("load", "run", "freeze", "free"):
            assert f"{stage} {what}" in steps
    assert steps[0] == "start" and steps[-1] == "save"
    assert steps.index("source hash") < steps.index("embedding load") < steps.index("head free")
    assert all(r["rss_mib"] > 0 for r in recs)
    peaks = [r["peak_mib"] for r in recs]
    if all(p is not None for p in peaks):   # Linux: the high-water mark is reset per step
        assert recs[-1]["process_peak_mib"] >= max(peaks)
        assert all(p >= r["rss_mib"] for p, r in zip(peaks, recs))
    assert [r["t_s"] for r in recs] == sorted(r["t_s"] for r in recs)


def test_trace_disabled_writes_nothing(tmp_path):
    t = memtrace.MemTrace(None)
    t.mark("x")
    assert not t.enabled and t.records == []


def test_trace_attributes_a_peak_to_its_step(tmp_path):
    """A 64 MiB buffer made and freed between two marks shows in that step's peak only."""
    t = memtrace.MemTrace(tmp_path / "t.jsonl")
    t.mark("before")
    buf = bytearray(64 << 20)
    buf[::4096] = b"\1" * len(buf[::4096])   # touch every page
    del buf
    t.mark("spike")
    t.mark("after")
    t.close()
    r = {x["step"]: x for x in map(json.loads, (tmp_path / "t.jsonl").read_text().splitlines())}
    if r["spike"]["peak_mib"] is None:
        pytest.skip("no /proc/self/clear_refs here: per-step peaks are not measured")
    assert r["spike"]["peak_mib"] - r["before"]["rss_mib"] >= 60
    assert r["after"]["peak_mib"] - r["before"]["rss_mib"] < 30
    assert r["after"]["process_peak_mib"] >= r["spike"]["peak_mib"]


def test_cli_trace_memory(tmp_path, capsys):
    d, _ = _checkpoint(tmp_path, "gpt2")
    trace = tmp_path / "t.jsonl"
    rc = main(["compile", str(ROOT / "recipes" / "int8" / "w8_weight_only.qrec"), "--model",
               str(d), "--stream", "--trace-memory", str(trace), "-o", str(tmp_path / "a")])
    assert rc == 0
    steps = [json.loads(x)["step"] for x in trace.read_text().splitlines()]
    assert "head free" in steps and steps[-1] == "save"
