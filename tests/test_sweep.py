"""qdsl sweep: a two-recipe smoke sweep on a tiny saved GPT-2 (cached on re-run),
table rendering, the robustness perturbation and the activation recorder."""

from __future__ import annotations

import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import tokenize
from pathlib import Path

import pytest
import torch

import qdsl
from qdsl.study import sweep as sweep_mod
from qdsl.study import sweepjob
from qdsl.passes.record import insert_recorders, recorded_names, relative_error
from qdsl.eval.robust import nl_spans, pct_drop, perturb_code
from qdsl.study.sweep import SweepConfig, run_sweep
from qdsl.study.jobs import recipe_path
from qdsl.study.tables import TABLES, Row, Table, render
from tiny import tiny, tiny_ids

CODE = '''#!/usr/bin/env python
"""Module docstring: adds numbers."""
import os  # the os module


def add(a, b):
    """Return a + b.\\n Escapes stay: \\t."""
    s = "a plain string stays"  # but this comment changes
    return a + b


class Point:
    \'\'\'A point.\'\'\'
    x = f"{os.sep} value"
'''


def _code_tokens(text: str) -> list[tuple[int, str]]:
    toks = list(tokenize.generate_tokens(io.StringIO(text).readline))
    return [(t.type, t.string) for t in toks if t.type != tokenize.COMMENT]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A saved tiny GPT-2 with a byte-level BPE tokenizer, and a small code benchmark.
    32 positions: shorter than prompt + new tokens, as stdlib-gpt2 (256) is."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("sweep")
    code = root / "code"
    code.mkdir()
    for i in range(4):
        (code / f"m{i}.py").write_text(CODE.replace("add", f"add{i}") * 3)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([CODE] * 4, vocab_size=300, min_frequency=1,
                            special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=32,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root


def _cfg(root) -> SweepConfig:
    return SweepConfig(model=str(root / "model"), bench=str(root / "code"), n=4,
                       ppl_windows=2, ctx_tokens=32, max_new_tokens=6, calib=str(root / "code"),
                       calib_default=2, calib_seq_len=16, layer_windows=2, layer_tokens=16)


RECIPES = [recipe_path("storti/t2_w8a8.qrec"), recipe_path("storti/t3_res_sum.qrec")]


def test_smoke_sweep_then_cached(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    res = run_sweep(_cfg(tiny_dir), out, recipes=RECIPES, progress=False)
    assert not res["failed"], res["failed"]
    rows = res["tables"]["recipes"]
    assert [r["label"] for r in rows] == ["Baseline (fp32)", "t2_w8a8", "t3_res_sum"]
    for r in rows:
        assert 0 <= r["es"] <= 100 and 0 <= r["em"] <= 100 and r["ppl"] > 0
    assert rows[0]["compression"] == 1.0 and rows[1]["compression"] > 1.5
    # the body (no embeddings, no lm_head, which t2_w8a8 keeps float) near a nominal 4x
    assert rows[0]["body_compression"] == 1.0
    assert rows[1]["compression"] < rows[1]["body_compression"] < 4.0
    assert rows[2]["bits"].startswith("W8A8 (+") and "A16 x2" in rows[2]["bits"]
    assert len(list((out / "cache").glob("*.json"))) == 3
    cached = json.loads(next(iter((out / "cache").glob("*.json"))).read_text())
    assert "samples" in cached and "layers" in cached
    # per-window losses are cached, so perplexity gets a paired CI against fp32
    assert len(cached["ppl_window_nll"]) == 2 == len(cached["ppl_window_tokens"])
    # the completions' own time, apart from perplexity's (qdsl.study.precision's rate)
    assert cached["complete_n"] == 4 and min(cached["complete_seconds"], cached["ppl_seconds"]) >= 0
    assert "ppl_window_nll" not in rows[1]     # results.json keeps the summary
    assert rows[1]["vs_float"]["ppl"]["method"] == "t on paired log-loss"
    assert rows[1]["vs_float"]["es"]["n"] == 4
    assert ", no CI (old cache)" not in (out / "tables.md").read_text()
    layers = [json.loads(p.read_text())["layers"] for p in (out / "cache").glob("*.json")]
    assert any("rel_err" in d.get("block.1.res_sum", {}) for d in layers)
    assert "| t3_res_sum |" in (out / "tables.md").read_text()
    assert {p.name for p in (out / "plots").iterdir()} >= {"pareto.png", "act_max.png",
                                                            "act_error.png"}

    assert "**Storti 2023**" in (out / "findings.md").read_text()
    assert len(res["findings"]) > 0

    def boom(*a, **k):
        raise AssertionError("a cached job ran again")
    monkeypatch.setattr(sweepjob, "run_job", boom)
    again = run_sweep(_cfg(tiny_dir), out, recipes=RECIPES, progress=False)
    assert again["tables"]["recipes"] == rows

    # --plan: read-only, nothing to run here; a new recipe is listed with the median
    # time of the finished quality jobs, and marked when a checkpoint of it waits
    before = sorted(str(p) for p in out.rglob("*"))
    assert sweep_mod.plan_sweep(_cfg(tiny_dir), out, recipes=RECIPES) == {"finished": 3,
                                                                         "jobs": []}
    extra = recipe_path("storti/t2_w8a32.qrec")
    plan = sweep_mod.plan_sweep(_cfg(tiny_dir), out, recipes=[*RECIPES, extra])
    (job,) = plan["jobs"]
    secs = sorted(json.loads(p.read_text())["seconds"] for p in (out / "cache").glob("*.json"))
    assert job["recipe"] == str(Path(extra).resolve()) and job["kind"] == "quality"
    assert plan["finished"] == 3
    assert job["estimate_s"] == secs[1] and not job["resumes"]
    assert job["calib_beyond"] is None                  # 2 windows, as the finished ones
    big = recipe_path("wei/fig7_calib_128.qrec")        # its own calib.samples = 128
    (longer,) = sweep_mod.plan_sweep(_cfg(tiny_dir), out, recipes=[big])["jobs"]
    assert longer["calib_beyond"] == 128
    assert sorted(str(p) for p in out.rglob("*")) == before
    (out / "partial").mkdir(exist_ok=True)
    (out / "partial" / f"{job['key']}.json").write_text("{}")
    assert sweep_mod.plan_sweep(_cfg(tiny_dir), out, recipes=[extra])["jobs"][0]["resumes"]


def test_robust_table_on_tiny_model(tiny_dir, tmp_path):
    table = Table("t", "robust smoke", "robust", (Row("FP", None), Row("W8A8", RECIPES[0])))
    res = run_sweep(_cfg(tiny_dir), tmp_path / "r", tables=[table], progress=False)
    assert not res["failed"], res["failed"]
    rob = [r["robust"] for r in res["tables"]["t"]]
    assert all(r["n"] == 4 and 0 <= r["changed"] <= 4 for r in rob)
    moved = [x for r in rob for x in r["perturbed_samples"]]
    assert len(moved) == sum(r["changed"] for r in rob) > 0
    assert all("es_clean" in x for x in moved)  # each with its clean score, for pairing
    reloaded = [r for r in res["runs"].values() if r["kind"] == "robust" and r["recipe"]]
    assert reloaded and "compile_seconds" not in reloaded[0]  # the quality job's artifact
    assert "%drop ES" in (tmp_path / "r" / "tables.md").read_text()


def test_humaneval_jobs_reuse_the_quality_artifacts(tiny_dir, tmp_path):
    from dataclasses import replace

    table = Table("he", "pass@1 smoke", "quality",
                  (Row("FP", None, {"pass@1": 11.71}), Row("W8A8", RECIPES[0], {"pass@1": 10.79})),
                  paper_cols=("pass@1",))
    other = Table("es", "ES only", "quality", (Row("FP", None), Row("W8A8", RECIPES[0])), ())
    cfg = replace(_cfg(tiny_dir), humaneval=2, humaneval_tokens=4)
    res = run_sweep(cfg, tmp_path / "h", tables=[table, other], progress=False)
    assert not res["failed"], res["failed"]
    for row in res["tables"]["he"]:
        assert row["humaneval"]["problems"] == 2 and 0 <= row["humaneval"]["pass@1"] <= 1
        assert "results" not in row["humaneval"]  # the completions stay in the cache
    he_runs = [r for r in res["runs"].values() if r["kind"] == "humaneval"]
    assert len(he_runs) == 2 and all("compile_seconds" not in r for r in he_runs)
    cached = [json.loads(p.read_text()) for p in (tmp_path / "h" / "cache").glob("*.json")]
    done = [c["humaneval"]["results"] for c in cached if c["kind"] == "humaneval"]
    assert [r["task_id"] for r in done[0]] == ["HumanEval/0", "HumanEval/1"]
    md = (tmp_path / "h" / "tables.md").read_text()
    header = next(ln for ln in md.splitlines() if ln.startswith("| Method"))
    assert header.rstrip(" |").endswith("pass@1 % (diff [95% CI]) | paper pass@1")
    assert re.search(r"\| \d+\.\d of 2 \([+-]\d+\.\d \[[+-]\d+\.\d, [+-]\d+\.\d\]\) \| 10\.8 \|", md)
    w8 = next(r for r in res["tables"]["he"] if r["recipe"])
    assert w8["vs_float"]["pass@1"]["n"] == 2 and "p_exact" in w8["vs_float"]["pass@1"]
    assert all("humaneval" not in row for row in res["tables"]["es"])  # not a pass@1 table
    assert md.count("pass@1 %") == 1
    # without --humaneval the same table plans no HumanEval jobs
    assert all(j.kind == "quality" for j in sweep_mod.plan_jobs([table]))


def test_render_marks_partial_tables_and_shows_paper_numbers():
    t = TABLES["storti-3"]
    base = {"es": 40.0, "em": 20.0, "ppl": 3.0, "compression": 1.0, "size_mb": 538.0,
            "bits": "fp32"}
    row = {"es": 30.5, "em": 10.0, "ppl": 9.0, "compression": 2.17, "size_mb": 247.9,
           "bits": "W8A8", "body_compression": 4.0}
    md = render(t, {None: base, "storti/t3_res_sum.qrec": row})
    assert "(partial: 2/17 rows)" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("| Residual Sum of block |"))
    # no per-sample scores to pair: the values alone, perplexity says why it has no CI
    assert line.split(" | ")[1:7] == ["W8A8", "30.5", "10", "9.00, no CI (old cache)",
                                      "2.17x / 4.00x", "247.9"]
    assert line.rstrip(" |").endswith("40 | 17")
    assert "(not run yet)" in md


def test_render_prints_paired_differences_with_cis():
    t = TABLES["storti-2"]
    ids = [f"s{i}" for i in range(4)]
    base = {"es": 40.0, "em": 50.0, "ppl": 3.0, "bits": "fp32", "ppl_window_nll": [1.0, 1.2],
            "samples": [{"id": i, "es": e, "em": m} for i, e, m in
                        zip(ids, (30.0, 40.0, 50.0, 40.0), (True, True, False, False))]}
    row = {"es": 38.0, "em": 25.0, "ppl": 3.3, "bits": "W8A8",
           "ppl_window_nll": [1.0 + math.log(1.1), 1.2 + math.log(1.1)],
           "samples": [{"id": i, "es": e, "em": m} for i, e, m in
                       zip(ids, (29.0, 37.0, 48.0, 38.0), (True, False, False, False))]}
    md = render(t, {None: base, "storti/t2_w8a8.qrec": row})
    line = next(ln for ln in md.splitlines() if ln.startswith("| W8A8 |"))
    cells = line.split(" | ")
    # d = [-1, -3, -2, -2]: mean -2, sd 0.816, t_{.975,3} = 3.182: half-width 1.30
    assert cells[2] == "38.0 (-2.0 [-3.3, -0.7])"
    assert cells[3].startswith("25 (-25 [") and cells[4] == "3.30 (x1.100 [1.100, 1.100])"
    assert next(ln for ln in md.splitlines() if ln.startswith("| Baseline |")).split(" | ")[2] \
        == "40.0"


def test_hosting_table_shows_bench_rows_against_fp32_and_torch_ao():
    def row(kind, prefill, decode):
        return {"kind": kind, "prefill_ms": prefill, "decode_ms": decode, "peak_rss_mb": 900.0}
    bench = {"rows": [row("fp32", 1800.0, 41.6), row("torch-ao", 515.3, 15.2),
                      row("artifact", 559.5, 17.79)]}
    res = {"es": 41.0, "em": 7.0, "ppl": 10.4, "compression": 3.97, "size_mb": 135.4,
           "bits": "W8A32", "artifact_bytes": 139.4e6, "bench": bench}
    md = render(TABLES["int8"], {"int8/w8a8_dynamic.qrec": res})
    line = next(ln for ln in md.splitlines() if ln.startswith("| W8A8 dynamic"))
    assert line.rstrip(" |").endswith("139.4 | 17.79 | 41.60 | 15.20 | 559.5 | 1800.0 | 900")
    assert "| torch.ao decode |" in md


def test_every_table_recipe_exists():
    from pathlib import Path
    for t in TABLES.values():
        for r in t.recipes():
            assert Path(recipe_path(r)).is_file(), r


def test_forced_calibration_size_spares_the_calibration_size_table():
    """--calib-samples overrides every recipe but Fig. 7's, whose rows vary it."""
    from qdsl.lang import load_recipe
    from qdsl.study.jobs import Job, effective_settings
    from qdsl.study.keys import job_key

    cfg = SweepConfig(calib_samples=32)
    fig7 = {r.label: Job.of(r) for r in TABLES["wei-fig7"].rows if r.recipe}
    sizes = {k: effective_settings(load_recipe(j.recipe), cfg, j.lower, j.own_calib)
             .calib_samples for k, j in fig7.items()}
    assert sizes == {"32 windows": 32, "128 windows": 128, "512 windows": 512,
                     "2048 windows": 2048}
    col = next(r for r in TABLES["wei-4"].rows if r.label == "Static (per-column)")
    assert effective_settings(load_recipe(Job.of(col).recipe), cfg).calib_samples == 32
    keys = {job_key(j, cfg, "m", "b") for j in fig7.values()}
    assert len(keys) == 4 and job_key(Job.of(col), cfg, "m", "b") not in keys


def test_forced_calibration_size_names_the_recipes_it_overrides():
    from qdsl.study.sweep import Job, forced_calib_overrides

    fig7 = [Job.of(r) for r in TABLES["wei-fig7"].rows if r.recipe]
    loose = [Job(j.recipe) for j in fig7]  # the same files named on the command line
    cfg = SweepConfig(calib_samples=32)
    assert forced_calib_overrides(fig7, cfg) == []  # the table's rows keep their sizes
    lines = forced_calib_overrides(loose + loose, cfg)
    assert lines == [f"--calib-samples 32 overrides fig7_calib_{n}.qrec's own "
                     f"`set calib.samples = {n}`" for n in (128, 512, 2048)]
    assert forced_calib_overrides(loose, SweepConfig()) == []


def test_calibration_plot_finds_rows_that_share_a_job():
    """Fig. 7's 512-window row is wei-4's per-column job under another name."""
    from qdsl.study.plots import calib_points
    from qdsl.study.sweep import Job, job_key

    cfg = SweepConfig()
    tables = [TABLES["wei-4"], TABLES["wei-fig7"]]
    keys = {Job.of(r): job_key(Job.of(r), cfg, "m", "b") for t in tables for r in t.rows}
    runs = {}
    for n in (32, 512):
        row = next(r for r in TABLES["wei-fig7"].rows if r.label == f"{n} windows")
        runs[keys[Job.of(row)]] = {"calib_samples": n, "es": 40.0, "ppl": 11.0}
    col = next(r for r in TABLES["wei-4"].rows if r.label == "Static (per-column)")
    assert keys[Job.of(col)] in runs  # the shared job
    assert calib_points(tables, keys, runs) == [(32, 40.0, 11.0), (512, 40.0, 11.0)]


def test_parallel_jobs_are_capped_by_memory_and_say_so(tiny_dir, monkeypatch, caplog):
    import types

    import psutil

    weights = sum(f.stat().st_size for f in (tiny_dir / "model").glob("*.safetensors"))
    need = 3.5 * weights + (1 << 30)
    monkeypatch.setattr(psutil, "virtual_memory",
                        lambda: types.SimpleNamespace(available=int(2.5 * need)))
    model = str(tiny_dir / "model")
    assert sweep_mod.memory_jobs(2, model) == 2 and not caplog.records
    assert sweep_mod.memory_jobs(8, model) == 2
    assert "-j 8: running 2 job(s) at a time" in caplog.text


def test_perturbation_changes_only_natural_language():
    out = perturb_code(CODE, seed=3, prob=1.0)
    assert len(_code_tokens(out)) == len(_code_tokens(CODE))
    assert "# THE OS MODULE" in out and "# BUT THIS COMMENT CHANGES" in out
    assert '"""MODULE DOCSTRING: ADDS NUMBERS."""' in out
    assert "RETURN A + B.\\n ESCAPES STAY: \\t." in out       # escapes keep their case
    assert "'''A POINT.'''" in out
    assert '"a plain string stays"' in out and 'f"{os.sep} value"' in out
    assert out.startswith("#!/usr/bin/env python\n")
    assert len(out) == len(CODE)
    # the only STRING tokens that differ are the three docstrings
    diff = [a for a, b in zip(_code_tokens(out), _code_tokens(CODE)) if a != b]
    assert len(diff) == 3 and all(t == tokenize.STRING for t, _ in diff)
    assert perturb_code(CODE, seed=3) == perturb_code(CODE, seed=3)  # seeded
    assert perturb_code(CODE, seed=3) != perturb_code(CODE, seed=4)


def test_perturbation_survives_a_prefix_cut_mid_statement():
    text = CODE + "x = foo(  # open call\n    1,\n"
    out = perturb_code(text, seed=0, prob=1.0)
    assert "# OPEN CALL" in out and len(out) == len(text)
    assert nl_spans("") == []
    assert pct_drop(50.0, 40.0) == pytest.approx(20.0) and pct_drop(0.0, 1.0) is None


def test_recorder_is_identity_and_measures_error():
    assert relative_error(torch.tensor([3.0, 4.5]), torch.tensor([3.0, 4.0])) == pytest.approx(0.1)
    model = tiny("gpt2")
    qm = qdsl.compile(model, "* -> w8a8\nlm_head -> skip\n", calib=tiny_ids(model, 2, 16),
                      progress=False)
    ids = tiny_ids(model, 1, 10, seed=4)
    before = qm(ids)
    names = recorded_names(qm.named)
    assert "block.1.res_sum" in names and "block.0.mlp.c_fc" in names
    recs = insert_recorders(qm.gm, qm.named, names, keep=True)
    assert torch.equal(qm(ids), before)
    r = recs["block.1.res_sum"]
    assert r.last is not None and r.max_abs[-1] == pytest.approx(float(r.last.abs().max()))
    # the recorder reads the quantizer's output: a value on the 8-bit grid
    assert r.last.unique().numel() <= 256


def test_cli_report_writes_the_document(tiny_dir, tmp_path):
    """`qdsl sweep --report --doc FILE`: the command shown regenerates the same sweep."""
    from qdsl.cli import main

    out, doc = tmp_path / "s", tmp_path / "results.md"
    code = main(["sweep", RECIPES[0], "--model", str(tiny_dir / "model"), "--bench",
                 str(tiny_dir / "code"), "--n", "4", "--ppl-windows", "0", "-o", str(out),
                 "--report", "--doc", str(doc)])
    assert code == 0
    text = doc.read_text()
    assert "<!-- qdsl:findings -->" in text and "## Discussion" in text
    assert f"--n 4 --ppl-windows 0 -o {out} --doc {doc}" in text and "--report" not in text


def test_cli_plan_lists_the_jobs_left_and_writes_nothing(tiny_dir, tmp_path, capsys):
    from qdsl.cli import main

    out = tmp_path / "s"
    code = main(["sweep", RECIPES[0], "--model", str(tiny_dir / "model"), "--bench",
                 str(tiny_dir / "code"), "--n", "4", "-o", str(out), "--plan"])
    text = capsys.readouterr().out
    assert code == 0 and not out.exists()
    assert f"{out}: 0 job(s) finished, 2 to run" in text
    assert re.search(r"quality +\? +fp32\n", text)
    assert re.search(r"quality +\? +recipes/storti/t2_w8a8.qrec\n", text)
    assert "no estimate: no finished job of these kinds in the cache yet" in text


def test_batch_size_reaches_every_eval_job_and_keys_only_compiled_rows(tiny_dir, tmp_path):
    """--batch-size B: the float, compiled and robust jobs decode B rows per forward (the
    compiled ones from the saved artifact re-captured with B rows); B enters the key of
    compiled rows only (their completions can change with it; the float model's do not)."""
    from dataclasses import replace

    from qdsl.study.sweep import Job, job_key

    table = Table("t", "robust smoke", "robust", (Row("FP", None), Row("W8A8", RECIPES[0])))
    one, two = _cfg(tiny_dir), replace(_cfg(tiny_dir), batch_size=2)
    a = run_sweep(one, tmp_path / "one", tables=[table], progress=False)
    b = run_sweep(two, tmp_path / "two", tables=[table], progress=False)
    assert not a["failed"] and not b["failed"], (a["failed"], b["failed"])
    runs_a = {(r["kind"], r["recipe"]): r for r in a["runs"].values()}
    runs_b = {(r["kind"], r["recipe"]): r for r in b["runs"].values()}
    assert len(runs_b) == 4
    assert {k: r["batch_size"] for k, r in runs_b.items()} == {k: 2 for k in runs_b}
    assert runs_a[("quality", None)]["batch_size"] == 8   # qdsl eval's float default
    assert runs_a[("quality", RECIPES[0])]["batch_size"] == 1   # and an artifact's
    # the float model's completions do not depend on the batch
    cache = lambda d, r: json.loads((d / "cache" / f"{r['key']}.json").read_text())  # noqa: E731
    fa = cache(tmp_path / "one", runs_a[("quality", None)])
    fb = cache(tmp_path / "two", runs_b[("quality", None)])
    assert [s["pred"] for s in fa["samples"]] == [s["pred"] for s in fb["samples"]]
    assert fa["ppl_window_nll"] == pytest.approx(fb["ppl_window_nll"], rel=1e-4)
    fp, w8 = Job(None), Job(RECIPES[0])
    assert job_key(fp, one, "m", "b") == job_key(fp, two, "m", "b")
    assert job_key(w8, one, "m", "b") != job_key(w8, two, "m", "b")
    assert job_key(w8, replace(one, batch_size=1), "m", "b") == job_key(w8, one, "m", "b")



class _Interrupt:
    """Stands in for ``module.attr`` (a function taking the model first): its ``nth`` call
    for the model named ``name`` raises while ``armed``; ``calls`` lists the models'
    names, call by call."""

    def __init__(self, monkeypatch, module, attr: str, nth: int, name: str = "t2_w8a8"):
        self.real, self.nth, self.name = getattr(module, attr), nth, name
        self.calls: list[str] = []
        self.armed = True
        monkeypatch.setattr(module, attr, self)

    def __call__(self, lm, *a, **k):
        self.calls.append(lm.name)
        if self.armed and lm.name == self.name and self.calls.count(self.name) == self.nth:
            raise RuntimeError("interrupted")
        return self.real(lm, *a, **k)


def test_an_interrupted_job_resumes_its_completions(tiny_dir, tmp_path, monkeypatch):
    """A quality job stopped mid-evaluation saved its finished batches (DIR/partial);
    the next sweep reloads the artifact it saved (no second calibration), completes
    only the remaining batches and caches what an uninterrupted run gives."""
    from dataclasses import replace

    import qdsl.eval.complete as complete

    cfg = replace(_cfg(tiny_dir), batch_size=2)   # 4 samples: 2 batches
    ref = run_sweep(cfg, tmp_path / "ref", recipes=RECIPES[:1], progress=False)
    stop = _Interrupt(monkeypatch, complete, "complete_lines", 2)   # the second batch never ends
    out = tmp_path / "s"
    first = run_sweep(cfg, out, recipes=RECIPES[:1], progress=False)
    assert len(first["failed"]) == 1
    partial = list((out / "partial").glob("*.json"))
    assert len(partial) == 1 and json.loads(partial[0].read_text())["n_done"] == 2
    compiled = json.loads(partial[0].read_text())["extra"]["compile"]
    stop.armed = False
    stop.calls.clear()
    again = run_sweep(cfg, out, recipes=RECIPES[:1], progress=False)
    assert not again["failed"] and stop.calls.count("t2_w8a8") == 1
    assert not list((out / "partial").glob("*.json"))   # cached now: removed
    key = partial[0].stem
    got = json.loads((out / "cache" / f"{key}.json").read_text())
    want = json.loads((tmp_path / "ref" / "cache" / f"{key}.json").read_text())
    assert got["resumed_samples"] == 2 and got["samples"] == want["samples"]
    assert got["compile_seconds"] == compiled["compile_seconds"]   # reloaded, not compiled
    assert got["ppl_window_nll"] == pytest.approx(want["ppl_window_nll"], rel=1e-5)


def test_saved_completions_resume_only_under_the_same_numerics(tiny_dir, tmp_path,
                                                             monkeypatch):
    """qdsl.NUMERICS (what a loaded artifact computes) is part of a job's checkpoint
    header: completions saved under another revision are computed again, and every
    entry records the revision it ran under."""
    from dataclasses import replace

    import qdsl.eval.complete as complete

    cfg = replace(_cfg(tiny_dir), batch_size=2)   # 4 samples: 2 batches
    stop = _Interrupt(monkeypatch, complete, "complete_lines", 2)
    out = tmp_path / "s"
    assert len(run_sweep(cfg, out, recipes=RECIPES[:1], progress=False)["failed"]) == 1
    (partial,) = (out / "partial").glob("*.json")
    assert json.loads(partial.read_text())["header"]["numerics"] == qdsl.NUMERICS
    stop.armed = False
    stop.calls.clear()
    monkeypatch.setattr(qdsl, "NUMERICS", qdsl.NUMERICS + 1)
    assert not run_sweep(cfg, out, recipes=RECIPES[:1], progress=False)["failed"]
    got = json.loads((out / "cache" / partial.name).read_text())
    assert "resumed_samples" not in got and stop.calls.count("t2_w8a8") == 2
    assert got["numerics"] == qdsl.NUMERICS


def test_loose_recipes_get_humaneval_jobs_and_an_interrupted_one_resumes(tiny_dir, tmp_path,
                                                                        monkeypatch):
    """--humaneval with recipes named on the command line plans their HumanEval jobs;
    a HumanEval job stopped mid-run keeps the completions it wrote (DIR/partial), and
    the next sweep generates only the problems it lacks and caches what an
    uninterrupted run gives."""
    from dataclasses import replace

    import qdsl.eval.humaneval as he

    cfg = replace(_cfg(tiny_dir), humaneval=3, humaneval_tokens=4)
    ref = run_sweep(cfg, tmp_path / "ref", recipes=RECIPES[:1], progress=False)
    assert not ref["failed"], ref["failed"]
    assert all(row["humaneval"]["problems"] == 3 for row in ref["tables"]["recipes"])
    stop = _Interrupt(monkeypatch, he, "generate", 3)   # the third problem never finishes
    out = tmp_path / "s"
    first = run_sweep(cfg, out, recipes=RECIPES[:1], progress=False)
    assert len(first["failed"]) == 1
    partial = list((out / "partial").glob("*.json"))
    assert len(partial) == 1 and json.loads(partial[0].read_text())["n_done"] == 2
    stop.armed = False
    stop.calls.clear()
    again = run_sweep(cfg, out, recipes=RECIPES[:1], progress=False)
    assert not again["failed"] and stop.calls == ["t2_w8a8"]   # the third problem alone
    assert not list((out / "partial").glob("*.json"))     # cached now: removed
    key = partial[0].stem
    got = json.loads((out / "cache" / f"{key}.json").read_text())
    want = json.loads((tmp_path / "ref" / "cache" / f"{key}.json").read_text())
    assert got["resumed_problems"] == 2
    assert got["humaneval"]["results"] == want["humaneval"]["results"]


def test_humaneval_batches_problems_and_resumes_whole_batches(tiny_dir, tmp_path, monkeypatch):
    """With --batch-size 2, HumanEval generates two problems per forward (the float
    model's completions equal one at a time); stopped in its second batch, the job
    keeps the first and the next sweep generates the second alone."""
    from dataclasses import replace

    import qdsl.eval.humaneval as he

    one = replace(_cfg(tiny_dir), humaneval=4, humaneval_tokens=4, batch_size=1)
    two = replace(one, batch_size=2)
    ref1 = run_sweep(one, tmp_path / "one", recipes=RECIPES[:1], progress=False)
    ref2 = run_sweep(two, tmp_path / "two", recipes=RECIPES[:1], progress=False)
    assert not ref1["failed"] and not ref2["failed"]

    def he_entries(root):
        return {c["recipe"]: c["humaneval"] for c in
                (json.loads(p.read_text()) for p in (root / "cache").glob("*.json"))
                if c["kind"] == "humaneval"}
    h1, h2 = he_entries(tmp_path / "one"), he_entries(tmp_path / "two")
    assert all(h["batch_size"] == 2 for h in h2.values())
    assert all(h["batch_size"] == 1 for h in h1.values())
    assert [r["completion"] for r in h2[None]["results"]] == \
        [r["completion"] for r in h1[None]["results"]]
    stop = _Interrupt(monkeypatch, he, "generate_batch", 2)   # the second batch never ends
    out = tmp_path / "s"
    assert len(run_sweep(two, out, recipes=RECIPES[:1], progress=False)["failed"]) == 1
    partial = list((out / "partial").glob("*.json"))
    assert len(partial) == 1 and json.loads(partial[0].read_text())["n_done"] == 2
    stop.armed = False
    stop.calls.clear()
    assert not run_sweep(two, out, recipes=RECIPES[:1], progress=False)["failed"]
    assert stop.calls == ["t2_w8a8"]
    got = json.loads((out / "cache" / f"{partial[0].stem}.json").read_text())
    assert got["resumed_problems"] == 2
    assert got["humaneval"]["results"] == h2[got["recipe"]]["results"]


def test_grow_from_completes_only_the_new_samples_on_the_smaller_runs_model(tiny_dir, tmp_path,
                                                                         monkeypatch):
    """--grow-from N0 keeps the n = N0 entry's completions, perplexity windows and model
    (no calibration) and completes only samples N0+1..n as their own batches; the
    grown entry has its own key (a from-scratch run at n batches differently); a job
    without an N0 entry fails saying so."""
    from dataclasses import replace

    import qdsl.eval.complete as complete
    from qdsl.study import sweepjob as sj
    from qdsl.study.keys import job_key

    small = replace(_cfg(tiny_dir), n=4, batch_size=2)
    out = tmp_path / "g"
    base = run_sweep(small, out, recipes=RECIPES[:1], progress=False)
    assert not base["failed"]
    before = {json.loads(f.read_text())["recipe"]: json.loads(f.read_text())
              for f in (out / "cache").glob("*.json")}
    # an entry older than the execution record (fp32 here): its rows per batch are
    # checked, what it does not record is named in the grown entry
    fp_file = next(f for f in (out / "cache").glob("*.json")
                   if json.loads(f.read_text())["recipe"] is None)
    fp_old = json.loads(fp_file.read_text())
    fp_old.pop("execution")
    fp_file.write_text(json.dumps(fp_old))
    seen = []
    real = complete.complete_lines

    def counted(lm, tok, samples, *a, **k):
        seen.extend(s.id for s in samples)
        return real(lm, tok, samples, *a, **k)

    def no_compile(*a, **k):
        raise AssertionError("a grown job calibrated again")

    monkeypatch.setattr(complete, "complete_lines", counted)
    monkeypatch.setattr(sj, "_compile", no_compile)
    big = replace(small, n=6, grow_from=4)
    grown = run_sweep(big, out, recipes=RECIPES[:1], progress=False)
    assert not grown["failed"], grown["failed"]
    after = [json.loads(f.read_text()) for f in (out / "cache").glob("*.json")]
    new = [e for e in after if e.get("grown_from")]
    assert len(new) == 2                                  # fp32 and the recipe
    for e in new:
        old = before[e["recipe"]]
        assert e["n"] == 6 and e["samples"][:4] == old["samples"]
        unverified = {"unverified": ["cpu", "torch"]} if e["recipe"] is None else {}
        assert e["grown_from"] == {"n": 4, "key": old["key"], "new_samples": 2, **unverified}
        assert e["ppl_window_nll"] == old["ppl_window_nll"] and e["layers"] == old["layers"]
        assert e["complete_n"] == 2 and e["complete_seconds"] >= 0   # the new samples' time
        assert e["ppl_seconds"] == old["ppl_seconds"]
        assert e["es"] == pytest.approx(sum(x["es"] for x in e["samples"]) / 6)
    new_ids = {x["id"] for x in new[0]["samples"][4:]}
    assert len(new_ids) == 2 and set(seen) == new_ids     # only the new samples completed
    scratch = job_key(sj.Job(None), replace(big, grow_from=None), "m", "b")
    assert scratch != job_key(sj.Job(None), big, "m", "b")
    monkeypatch.undo()
    missing = run_sweep(replace(small, n=6, grow_from=3), tmp_path / "m", recipes=RECIPES[:1],
                        progress=False)
    errors = [v["error"] for v in missing["failed"].values()]
    assert len(errors) == 2 and all("no finished n = 3 entry" in e for e in errors)


_POOL_SCRIPT = '''
import os, sys, time
from pathlib import Path
from qdsl.cli import app
from qdsl.study import executors

def sleeper(job, cfg, samples, out, key, threads, progress, art, store):
    Path(out, f"{os.getpid()}.pid").write_text(key)
    time.sleep(600)
    return key, {}

if __name__ == "__main__":
    executors._worker = sleeper
    app._terminate_as_interrupt()
    subs = [("job", f"k{i}", None) for i in range(4)]
    try:
        executors.LocalExecutor(workers=2, progress=False).run(
            subs, None, None, Path(sys.argv[1]), None, 1, {}, lambda key, r: None)
    except KeyboardInterrupt:
        sys.exit(143)
'''


_DYING_SCRIPT = '''
import os, signal, sys
from pathlib import Path
from qdsl.cli import app
from qdsl.study import executors

def dying(job, cfg, samples, out, key, threads, progress, art, store):
    os.kill(os.getpid(), signal.SIGKILL)   # as the kernel's OOM killer does

if __name__ == "__main__":
    executors._worker = dying
    subs = [("job", f"k{i}", None) for i in range(2)]
    done = {"k": {"peak_rss_bytes": 10 * 2**30}}
    try:
        executors.LocalExecutor(workers=2, progress=False).run(
            subs, None, None, Path(sys.argv[1]), None, 1, done, lambda key, r: None)
    except app.QdslError as e:
        print(e)
        sys.exit(2)
'''


def test_a_worker_killed_by_the_system_is_a_clear_error_not_a_bug(tmp_path):
    """A worker the kernel kills (out of memory) breaks the pool: the sweep says what
    probably happened and how to resume, instead of 'internal error ... a bug'."""
    script = tmp_path / "dying.py"
    script.write_text(_DYING_SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "worker process died" in out.stdout and "peaked at 10.0 GiB" in out.stdout
    assert "smaller -j" in out.stdout


def test_sigterm_stops_the_workers_of_a_parallel_sweep(tmp_path):
    """SIGTERM to ``sweep -j 2`` (the CLI turns it into KeyboardInterrupt) terminates
    the running workers and cancels the queued jobs, instead of waiting for them."""
    script = tmp_path / "pool.py"
    script.write_text(_POOL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)])
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("*.pid"))) < 2:   # both workers are in a job
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    pids = [int(p.stem) for p in tmp_path.glob("*.pid")]
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert time.monotonic() - t0 < 30               # not the 600 s the jobs would take

    def alive(pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    while any(alive(p) for p in pids) and time.monotonic() - t0 < 30:
        time.sleep(0.2)
    assert not any(alive(p) for p in pids)
    assert len(list(tmp_path.glob("*.pid"))) == 2  # the queued jobs never started


def test_humaneval_key_ignores_the_line_completion_settings():
    """pass@1 never reads the line-completion bench, its size or perplexity windows:
    a sweep at another --n / --ppl-windows reuses it; the prompt mode and the problems
    still count."""
    from dataclasses import replace

    from qdsl.study.jobs import HUMANEVAL, QUALITY, Job
    from qdsl.study.sweep import job_key

    cfg = SweepConfig(model="smollm2-135m", humaneval=164)
    for recipe in (None, RECIPES[0]):
        he, q = Job(recipe, HUMANEVAL), Job(recipe, QUALITY)
        other = replace(cfg, n=1572, ppl_windows=256, ctx_tokens=128, layer_windows=0)
        assert job_key(he, cfg, "m", "b") == job_key(he, other, "m", "b2")
        assert job_key(q, cfg, "m", "b") != job_key(q, other, "m", "b2")
        assert job_key(he, cfg, "m", "b") != job_key(he, replace(cfg, humaneval=82), "m", "b")
        assert job_key(he, cfg, "m", "b") != job_key(he, replace(cfg, prompt="newline"), "m", "b")
        assert job_key(he, cfg, "m", "b") != job_key(he, cfg, "m2", "b")


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_sweep_logged_or_parallel_shows_each_jobs_progress_as_labelled_lines(
        tiny_dir, tmp_path, capfd, jobs):
    """-j 2: the pool workers cannot share live bars; -j 1 with stderr not a terminal (a
    log file; here pytest's capture): live bars would pile up. Each phase of each job
    prints plain lines starting with the job's label (``qdsl.progress``)."""
    res = run_sweep(_cfg(tiny_dir), tmp_path / f"j{jobs}", recipes=RECIPES[:1], jobs=jobs)
    assert not res["failed"], res["failed"]
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("[")]
    for label in ("[fp32]", "[storti/t2_w8a8]"):
        mine = [ln for ln in lines if ln.startswith(label + " ")]
        assert any(" complete: 4/4 " in ln for ln in mine), (label, lines)
        assert any(" perplexity: " in ln for ln in mine), (label, lines)
    assert any(ln.startswith("[storti/t2_w8a8] calibrating: ") for ln in lines), lines
    assert any(ln.startswith("[sweep] jobs: 2/2 ") for ln in lines), lines
    assert "\r" not in err   # no redrawing bar, transformers' "Loading weights" included
