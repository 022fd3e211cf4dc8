"""tools/headline.py: the three-model headline table is built from sweeps' results.json."""

from __future__ import annotations

import json
from pathlib import Path

from toolmod import load_tool


def _tool():
    return load_tool("headline")


def _results(d: Path, n: int, wei4: list[dict]) -> Path:
    d.mkdir()
    (d / "results.json").write_text(json.dumps({"n_samples": n, "tables": {"wei-4": wei4}}))
    return d


def test_headline_reads_rows_by_table_recipe_and_keeps_prose(tmp_path):
    he = {"problems": 82, "passed": 20, "pass@1": 20 / 82}
    fp = {"label": "Full precision", "es": 42.0, "em": 9.0, "ppl": 10.0}
    dyn = {"label": "Dynamic (per-tensor)", "es": 39.9, "em": 7.0, "ppl": 2.6e6,
           "recipe": "/elsewhere/recipes/wei/t5_w8a8.qrec"}  # the alias that ran
    smol = _results(tmp_path / "s", 100, [fp, dyn])
    qwen = _results(tmp_path / "q", 20, [{**fp, "humaneval": he}, {"label": "x"}])
    gpt2 = _results(tmp_path / "g", 100, [{**fp, "ppl": 62.43}])
    doc = tmp_path / "r.md"
    doc.write_text("prose\n<!-- qdsl:headline -->\nold\n<!-- /qdsl:headline -->\nmore prose\n")
    tool = _tool()
    tool.main(["--doc", str(doc), "--smol", str(smol), "--qwen", str(qwen), "--gpt2", str(gpt2)])
    text = doc.read_text()
    assert text.startswith("prose\n<!-- qdsl:headline -->\n| recipe |")
    assert text.endswith("<!-- /qdsl:headline -->\nmore prose\n") and "old" not in text
    assert "| fp32 | 42.0 / 9 / 10.0 | 42.0 / 9 / 10.0 | 24.4 | 62.43 |" in text
    assert "| Wei W8A8 dynamic, per-tensor | 39.9 / 7 / 2.6e+06 | - | - | - |" in text
    assert "Qwen HumanEval pass@1 % (diff [95% CI]; first 82)" in text


def test_headline_prints_es_cis_and_the_precision_block(tmp_path):
    es = {"est": -2.1, "lo": -6.2, "hi": 2.0, "n": 100, "method": "t", "sd": 20.9}
    fp = {"label": "Full precision", "es": 42.0, "em": 9.0, "ppl": 10.0}
    dyn = {"label": "Dynamic (per-tensor)", "es": 39.9, "em": 7.0, "ppl": 11.7,
           "eval_seconds": 400.0, "vs_float": {"es": es}}
    dirs = [_results(tmp_path / k, 100, [fp, dyn]) for k in ("s", "q", "g")]
    doc = tmp_path / "r.md"
    doc.write_text("<!-- qdsl:headline -->\n<!-- /qdsl:headline -->\n"
                   "<!-- qdsl:precision -->\nold\n<!-- /qdsl:precision -->\n")
    _tool().main(["--doc", str(doc), "--smol", str(dirs[0]), "--qwen", str(dirs[1]),
                  "--gpt2", str(dirs[2])])
    text = doc.read_text()
    assert "| Wei W8A8 dynamic, per-tensor | 39.9 (-2.1 [-6.2, +2.0]) / 7 / 11.7 |" in text
    # SD 20.9 for a half-width of 1.5: n = 749 (qdsl.study.stats.n_for_halfwidth)
    assert "| Wei W8A8 dynamic, per-tensor | 20.9 | 100 | 4.1 | 749 |" in text
    assert "SmolLM2-135M: every listed row within ±1.5 ES points needs n = 749" in text
    assert "4.0 s per sample" in text and "old" not in text


def test_findings_block_lists_what_the_large_sweep_decides_beside_the_base(tmp_path):
    def finding(claim, verdict, evidence="ΔES -1.0 [-2.0, +0.1]"):
        return {"paper": "Wei et al. 2023", "claim": claim, "table": "wei-4",
                "verdict": verdict, "evidence": evidence, "paper_evidence": ""}

    def results(d, n, windows, findings):
        d.mkdir()
        (d / "results.json").write_text(json.dumps({
            "n_samples": n, "config": {"ppl_windows": windows}, "tables": {},
            "findings": findings}))
        return d

    large = results(tmp_path / "large", 1572, 256, [
        finding("near lossless", "contradicted"), finding("per-column wins", "inconclusive"),
        finding("flat", "not run yet", "needs wei-fig7: 32 windows")])
    base = results(tmp_path / "base", 100, 32, [
        finding("near lossless", "inconclusive"), finding("per-column wins", "inconclusive"),
        finding("flat", "reproduced")])
    empty = results(tmp_path / "e", 100, 32, [])
    doc = tmp_path / "r.md"
    doc.write_text("<!-- qdsl:headline -->\n<!-- /qdsl:headline -->\n"
                   "<!-- qdsl:findings-headline -->\nold\n<!-- /qdsl:findings-headline -->\n")
    _tool().main(["--doc", str(doc), "--smol", str(large), "--base", str(base),
                  "--qwen", str(empty), "--gpt2", str(empty)])
    text = doc.read_text()
    assert "1,572 samples per row (256 perplexity windows)" in text and "old" not in text
    assert "reproduced: 0, contradicted: 1, inconclusive: 1" in text
    assert "| near lossless | wei-4 | **contradicted** | ΔES -1.0 [-2.0, +0.1] | " \
           "inconclusive (changed) |" in text
    assert "| per-column wins | wei-4 | **inconclusive** | ΔES -1.0 [-2.0, +0.1] | " \
           "inconclusive |" in text
    assert "*flat* (wei-fig7: 32 windows)" in text
