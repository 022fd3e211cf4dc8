"""Bench harness smoke test on a tiny model (tiny context, 2 repeats): runs the
children, tabulates, writes JSON and a plot. No timing assertions."""

import json

import pytest
from tiny import tiny

from qdsl.eval import hosting as bench
from qdsl.cli import main
from qdsl.errors import ArtifactError


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_gpt2")
    tiny("gpt2").save_pretrained(d)
    return d


def test_bench_cli_tiny(tiny_dir, tmp_path, capsys):
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    rc = main(["bench", str(tiny_dir), "--lower-all", "w8a8-dynamic", "--context", "8",
               "--decode-tokens", "2", "--repeats", "2", "--rounds", "1",
               "--json", str(out_json), "--plot", str(out_png)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| fp32 |" in table and "Conv1D -> Linear" in table and "qdsl w8a8-dynamic" in table
    result = json.loads(out_json.read_text())
    names = [r["name"] for r in result["rows"]]
    assert len(names) == 5 and names[0] == "fp32" and names[1].startswith("fp32 graph")
    for r in result["rows"]:
        assert r["decode_ms"] > 0 and r["prefill_ms"] > 0 and r["peak_rss_mb"] > 0
    assert result["rows"][-1]["size_mb"] < result["rows"][0]["size_mb"]
    assert out_png.read_bytes()[:4] == b"\x89PNG"
    # where the time goes: capability, bandwidth, the bound, the kernels that ran
    cond = result["conditions"]
    assert cond["capability"] and cond["threads"] == 1
    for r in result["rows"]:
        assert r["extra"]["bandwidth_gbs"] > 0 and r["extra"]["weight_bytes_per_token"] > 0
        assert r["extra"]["bound_ms"] > 0
    ours = result["rows"][-1]["extra"]
    assert ours["kernels"] and set(ours["kernels"]) <= {f"{op}/{c}" for op in
                                                        ("w8a8", "w8", "w4", "embedding_int8")
                                                        for c in ("decode", "prefill")}
    assert ours["weight_bytes_per_token"] < result["rows"][0]["extra"]["weight_bytes_per_token"]
    assert "decode / bandwidth bound" in table and "Kernels of qdsl w8a8-dynamic" in table
    assert "read bandwidth" in table and cond["capability"] in table
    # the graph rows' key/value cache: every layer's keys and values, float32, at the
    # mean filled length of the timed steps (context 8, then 2 tokens: 9.5 positions)
    c = tiny("gpt2").config
    per_position = c.n_layer * 2 * c.n_embd * 4
    graphs = [r for r in result["rows"] if r["name"].startswith("fp32 graph")]
    assert graphs and all(r["extra"]["kv_bytes_per_token"] == per_position * 9.5
                          and r["extra"]["kv_dtype"] == "float32" for r in graphs)
    assert "kv_bytes_per_token" not in result["rows"][0]["extra"]    # transformers' cache
    assert "Key/value cache read per decode step" in table


def test_weight_bytes_count_a_tied_head_once_and_skip_gather_only_tables():
    from torch import nn
    from qdsl.eval.hosting_hw import weight_bytes_per_token

    emb, head = nn.Embedding(10, 4), nn.Linear(4, 10)
    assert weight_bytes_per_token(nn.ModuleList([emb, head])) == (40 + 10) * 4   # emb skipped
    head.weight = emb.weight                                                     # tied
    assert weight_bytes_per_token(nn.ModuleList([emb, head])) == (40 + 10) * 4
    model = nn.ModuleList([emb, head])
    model.register_buffer("key_cache", __import__("torch").zeros(100))          # not weights
    assert weight_bytes_per_token(model) == (40 + 10) * 4


def test_weight_bytes_of_torch_ao_dynamic_linears_are_their_packed_int8():
    import warnings
    import torch
    from qdsl.eval.hosting_hw import weight_bytes_per_token

    m = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.LayerNorm(32))
    assert weight_bytes_per_token(m) == (64 * 32 + 32 + 2 * 32) * 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(m, {torch.nn.Linear}, dtype=torch.qint8)
    assert weight_bytes_per_token(q) == 64 * 32 + 32 * 4 + 2 * 32 * 4


FAKE_LLAMA_BENCH = """#!{python}
import json, sys
a = sys.argv[1:]
p, n = int(a[a.index("-p") + 1]), int(a[a.index("-n") + 1])
depth = int(a[a.index("-d") + 1]) if "-d" in a else 0
ts = 200.0 if n == 0 else (40.0 if depth else 50.0)
print(json.dumps([{{"model_type": "llama 135M Q8_0", "model_size": 150000000, "n_prompt": p,
                   "n_gen": n, "n_depth": depth, "avg_ts": ts}}]))
"""


def test_llamacpp_rows_from_llama_bench_json(tmp_path):
    import sys
    from qdsl.eval import hosting_hw

    binary = tmp_path / "llama-bench"
    binary.write_text(FAKE_LLAMA_BENCH.format(python=sys.executable))
    binary.chmod(0o755)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(96))
    (row,) = hosting_hw.llamacpp_rows(str(binary), [str(gguf)], 512, 32, 1, 2)
    assert row["prefill_ms"] == pytest.approx(512 / 200 * 1e3)
    assert row["decode_ms"] == pytest.approx(25.0)                   # after 512 tokens
    assert row["extra"]["decode_ms_empty_context"] == pytest.approx(20.0)
    assert row["extra"]["weight_bytes_per_token"] == 150000000
    assert "Q8_0" in row["name"] and row["kind"] == "llama.cpp"


def test_llamacpp_options_are_checked(tmp_path):
    from qdsl.errors import OptionError
    from qdsl.eval import hosting_hw

    with pytest.raises(OptionError, match="go together"):
        hosting_hw.check_llamacpp(None, ["x.gguf"])
    with pytest.raises(OptionError, match="not an executable"):
        hosting_hw.check_llamacpp(str(tmp_path / "nope"), ["x.gguf"])


def test_cost_is_linear_in_latency():
    cfg = {"pred_tokens": 20, "power_watts": 100.0, "price_per_kwh": 0.2}
    c = bench.cost({"prefill_ms": 1000.0, "decode_ms": 50.0}, cfg)   # 2 s per prediction
    assert c["s_per_pred"] == pytest.approx(2.0)
    assert c["wh_per_1k"] == pytest.approx(100 * 2 * 1000 / 3600)
    assert c["usd_per_1k"] == pytest.approx(c["wh_per_1k"] / 1000 * 0.2)


def test_not_an_artifact(tiny_dir, tmp_path):
    with pytest.raises(ArtifactError, match="qdsl_artifact.json"):
        bench.run_bench(str(tiny_dir), artifact=str(tmp_path),
                        cfg=bench.BenchConfig(context=4, decode_tokens=1, repeats=1, rounds=1))


def test_artifact_with_a_short_cache_is_benched_at_the_bench_context(tiny_dir, tmp_path):
    """A sweep compiles with a short static cache (305 slots); the bench prefills 512
    tokens: both graph rows re-capture with room for the context and decoded tokens."""
    import qdsl
    from tiny import tiny_ids

    model = tiny("gpt2")
    qm = qdsl.compile(model, "* -> w8 a.dynamic per_token\n", calib=tiny_ids(model, 2, 8),
                      lower="int8", max_cache_len=10, progress=False)
    art = qm.save(tmp_path / "art")
    res = bench.run_bench(str(tiny_dir), artifact=str(art),
                          cfg=bench.BenchConfig(context=16, decode_tokens=2, repeats=1, rounds=1))
    rows = {r["kind"]: r for r in res["rows"]}
    assert rows["artifact"]["decode_ms"] > 0 and rows["fp32-graph"]["prefill_ms"] > 0


def test_also_measures_further_artifacts_in_the_same_run(tiny_dir, tmp_path):
    """``also``: a second artifact is a row of the same run, at the same cache length as
    the first (so the two compare on the run's load); rows sharing a directory name are
    told apart by their paths."""
    import qdsl
    from tiny import tiny_ids

    model = tiny("gpt2")
    arts = []
    for sub, recipe in (("a", "* -> w8 a.dynamic per_token\n"), ("b", "* -> w8\n")):
        qm = qdsl.compile(model, recipe, calib=tiny_ids(model, 2, 8), lower="int8",
                          max_cache_len=10, progress=False)
        arts.append(str(qm.save(tmp_path / sub / "art")))
    res = bench.run_bench(str(tiny_dir), artifact=arts[0], also=(arts[1],),
                          cfg=bench.BenchConfig(context=8, decode_tokens=2, repeats=1, rounds=1))
    rows = [r for r in res["rows"] if r["kind"] == "artifact"]
    assert [r["name"] for r in rows] == [f"qdsl artifact {a}" for a in arts]
    assert all(r["decode_ms"] > 0 for r in rows)
    with pytest.raises(ArtifactError, match="qdsl_artifact.json"):
        bench.run_bench(str(tiny_dir), artifact=arts[0], also=(str(tmp_path),),
                        cfg=bench.BenchConfig(context=4, decode_tokens=1, repeats=1, rounds=1))


@pytest.mark.slow
def test_compile_decode_rows(tiny_dir, tmp_path, monkeypatch):
    """--compile-decode adds the fp32 graph and the artifact again with the decode step
    compiled; each child records the first step's time (aot_eager here: the tracing
    plumbing without inductor's C++ build, which tests/runtime/test_compiled_decode.py
    covers)."""
    import qdsl
    from tiny import tiny_ids

    monkeypatch.setenv("QDSL_COMPILE_BACKEND", "aot_eager")
    model = tiny("gpt2")
    qm = qdsl.compile(model, "* -> w8 a.dynamic per_token\n", calib=tiny_ids(model, 2, 8),
                      lower="int8", max_cache_len=24, progress=False)
    art = qm.save(tmp_path / "art")
    res = bench.run_bench(str(tiny_dir), artifact=str(art), compile_decode=True,
                          cfg=bench.BenchConfig(context=8, decode_tokens=2, repeats=1, rounds=1))
    rows = {r["name"]: r for r in res["rows"]}
    names = [n for n in rows if n.endswith(", compiled decode")]
    assert len(names) == 2 and any(n.startswith("fp32 graph") for n in names)
    for n in names:
        run = rows[n]["extra"]["runs"][0]
        assert run["compile_failed"] is None and run["compile_s"] > 0
        assert run["huge_pages_mb"] == 0          # a tiny graph: under hugepages.MIN_BYTES
        assert rows[n]["decode_ms"] > 0
    assert all("compile_s" not in r["extra"]["runs"][0] for n, r in rows.items()
               if n not in names)
    text = bench.markdown(res)
    assert "first decode step (trace + compile or cache load)" in text
    assert "weights and caches on 4 KiB pages." in text


def test_also_cli_errors(tiny_dir, tmp_path, capsys):
    """--also without an artifact first, or with a directory that is not one: one line
    naming the option, exit 2, no traceback."""
    rc = main(["bench", str(tiny_dir), "--also", str(tiny_dir)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--also" in err and "Traceback" not in err


def test_read_bandwidth_is_the_fastest_sum_over_fresh_buffers(monkeypatch):
    """The bound's bandwidth is the highest read over several fresh buffers (a slow
    buffer or a busy moment never loosens the bound), at the requested threads."""
    import torch
    from qdsl.eval import hosting_hw

    made, threads_seen = [], []
    real_ones = torch.ones

    def ones(n):
        made.append(n)
        return real_ones(n)        # 8 MiB; the clock below decides the answer

    # each timed sum lasts 4, 2, 8, ... ms: one interval per (start, stop) pair
    durations = iter([4e-3, 2e-3, 8e-3, 4e-3, 3e-3, 5e-3])
    clock = {"t": 0.0, "start": True}

    def perf_counter():
        if not clock["start"]:
            clock["t"] += next(durations)
        clock["start"] = not clock["start"]
        return clock["t"]

    real_sum = torch.Tensor.sum

    def counted_sum(self, *a, **k):
        threads_seen.append(torch.get_num_threads())
        return real_sum(self, *a, **k)

    monkeypatch.setattr(hosting_hw.torch, "ones", ones)
    monkeypatch.setattr(hosting_hw.time, "perf_counter", perf_counter)
    monkeypatch.setattr(torch.Tensor, "sum", counted_sum)
    before = torch.get_num_threads()
    gbs = hosting_hw.read_bandwidth_gbs(threads=1, mb=8, repeats=2, buffers=3)
    assert len(made) == 3 and made[0] == 8 * 2**20 // 4          # three fresh buffers
    assert len(threads_seen) == 3 * 3 and set(threads_seen) == {1}   # warm-up + 2 each
    assert gbs == pytest.approx(8 * 2**20 / 2e-3 / 1e9)          # the fastest: 2 ms
    assert torch.get_num_threads() == before


def test_report_shows_decode_per_round_or_warns_of_one_round():
    """With several rounds the report lists each fresh process's decode median (how far
    one process's figure moves); with one round it says a row cannot show that."""
    def row(name, per_round):
        runs = [{"decode_all_ms": [v, v + 0.2, v - 0.2]} for v in per_round]
        return {"name": name, "kind": "qdsl", "size_mb": 100.0, "rss_load_mb": 500.0,
                "peak_rss_mb": 600.0, "prefill_ms": 800.0, "decode_ms": per_round[0],
                "tokens_per_s": 1e3 / per_round[0], "extra": {"runs": runs}}

    def result(rounds, per_round):
        cfg = {"context": 512, "decode_tokens": 32, "repeats": 3, "rounds": rounds,
               "threads": 1, "pred_tokens": 20, "power_watts": 65, "price_per_kwh": 0.15}
        return {"model": "m", "config": cfg, "conditions": {"torch": "2", "load_avg": [0, 0, 0]},
                "rows": [row("fp32", [40.0] * rounds), row("qdsl a", per_round)]}

    text = bench.markdown(result(3, [8.0, 8.4, 7.9]))
    assert "Decode per round (each a fresh process; median of its repeats): " \
           "fp32 40.00 / 40.00 / 40.00 ms (max/min 1.00); " \
           "qdsl a 8.00 / 8.40 / 7.90 ms (max/min 1.06)." in text
    one = bench.markdown(result(1, [8.0]))
    assert "Decode per round" not in one and "measure with --rounds 3 or more" in one
