"""tools/search_pareto.py: rows from eval JSONs, ratios with CIs, sizes, the plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qdsl.study.stats import ppl_ratio
from toolmod import load_tool

FP32 = [3.0, 3.2, 2.9, 3.1, 3.05]


def _tool():
    return load_tool("search_pareto")


def _eval(path: Path, nll: list[float], art: str = "gone/art", base=FP32, tokens=None) -> Path:
    tokens = tokens or [100] * len(base)
    row = lambda model, x: {"model": model, "n": 5, "es": 40.0, "ppl": 2.0 ** sum(x),
                            "ppl_window_nll": x, "ppl_window_tokens": tokens}
    path.write_text(json.dumps({"target": row(art, nll), "baseline": row("m", base)}))
    return path


def test_rows_are_ratios_to_fp32_with_paired_cis_and_the_plot_is_written(tmp_path, capsys):
    tool = _tool()
    found = _eval(tmp_path / "f.json", [x + 0.01 for x in FP32])
    uni = _eval(tmp_path / "u.json", [x + d for x, d in zip(FP32, [0.1, 0.3, 0.2, 0.15, 0.2])])
    out = tmp_path / "p.png"
    assert tool.main(["--found", f"found={found}@10.5", "--uniform", f"uni={uni}@10.25",
                      "-o", str(out), "--json", str(tmp_path / "rows.json")]) == 0
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["name"], r["kind"], r["mb"]) for r in rows] == [("found", "found", 10.5),
                                                             ("uni", "uniform", 10.25)]
    want = ppl_ratio(json.loads(uni.read_text())["target"]["ppl_window_nll"], FP32)
    assert (rows[1]["ratio"], rows[1]["lo"], rows[1]["hi"]) == (want.est, want.lo, want.hi)
    assert rows[0]["ratio"] == pytest.approx(2.718281828 ** 0.01)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| uni | uniform | 10.250 |" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".p.png")]  # no temp left


def test_size_counted_from_a_recipe_on_the_model(tiny_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    tool = _tool()
    model = str(tiny_dir / "model")
    m = AutoModelForCausalLM.from_pretrained(model)
    fp32 = sum(t.numel() * 4 for t in {id(t): t for t in
                                       list(m.parameters()) + list(m.buffers())
                                       if torch.is_floating_point(t)}.values()) / 1e6
    (tmp_path / "float.qrec").write_text("* -> w32\n")
    (tmp_path / "w8.qrec").write_text("op:linear -> w8\n")
    ev = _eval(tmp_path / "e.json", FP32)
    assert tool.recipe_mb(tmp_path / "float.qrec", model) == pytest.approx(fp32)
    rows = tool.rows_of([f"a={ev}@{tmp_path / 'w8.qrec'}"], [], model)
    assert rows[0]["mb"] < fp32 and rows[0]["size_from"] == str(tmp_path / "w8.qrec")


def test_bad_rows_are_one_line_errors(tmp_path, capsys):
    tool = _tool()
    a = _eval(tmp_path / "a.json", FP32)
    b = _eval(tmp_path / "b.json", FP32[:4], base=FP32[:4])
    out = str(tmp_path / "p.png")
    assert tool.main(["--found", f"a={a}@1", "--uniform", f"b={b}@1", "-o", out]) == 2
    assert "other perplexity windows than the rows before it" in capsys.readouterr().err
    assert tool.main(["--found", f"a={a}", "-o", out]) == 2
    err = capsys.readouterr().err
    assert "gone/art) is not here: give the size" in err and "Traceback" not in err
    assert tool.main(["--found", f"a={a}@nope.qrec", "-o", out]) == 2
    assert "neither a size in MB nor a recipe file" in capsys.readouterr().err
    assert not Path(out).exists()


def test_rows_without_a_baseline_take_the_fp32_file(tmp_path):
    """Evals run with `qdsl eval --no-baseline` pair with --fp32's losses; without
    --fp32 they are refused."""
    tool = _tool()
    alone = tmp_path / "a.json"
    nll = [x + 0.05 for x in FP32]
    alone.write_text(json.dumps({"target": {"model": "art", "n": 5, "es": 40.0, "ppl": 9.0,
                                            "ppl_window_nll": nll,
                                            "ppl_window_tokens": [100] * 5},
                                 "baseline": None}))
    fp32 = _eval(tmp_path / "w.json", [x + 1 for x in FP32])   # its baseline is FP32
    out = tmp_path / "p.png"
    assert tool.main(["--found", f"f={alone}@1.0", "-o", str(out)]) == 2
    assert tool.main(["--found", f"f={alone}@1.0", "--fp32", str(fp32), "-o", str(out),
                      "--json", str(tmp_path / "rows.json")]) == 0
    row = json.loads((tmp_path / "rows.json").read_text())[0]
    want = ppl_ratio(nll, FP32)
    assert (row["ratio"], row["lo"], row["hi"]) == (want.est, want.lo, want.hi)
