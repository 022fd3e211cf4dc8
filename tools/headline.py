"""Rewrite the three-model headline table of docs/results.md from the sweeps' results.

    python tools/headline.py    # docs/results.md from results/sweep-smollm2-n1572,
                                # results/sweep-qwen, results/sweep-stdlib-gpt2

The table sits between ``<!-- qdsl:headline -->`` and ``<!-- /qdsl:headline -->``
(``qdsl sweep --doc`` leaves blocks it does not own alone). Each cell is read from a
sweep's ``results.json`` (the rows of its seed tables), matched by the recipe file
relative to ``recipes/``; a row a sweep has not run shows ``-``. Nothing is typed by hand, so the table cannot drift from the caches.
ES cells carry the row's paired difference from fp32 with its 95% CI (``vs_float`` in
results.json, ``qdsl.study.stats``). The ``<!-- qdsl:precision -->`` block, when the
document has one, gets each model's sample sizes for a ±1.5-point ES CI
(``qdsl.study.precision``). The ``<!-- qdsl:findings-headline -->`` block, when there
is one, gets the seed findings whose rows are all in the SmolLM2 headline sweep, each
beside its verdict in the page's own sweep (``--base``, every table at smaller n), so
that a verdict that changed with n shows.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from qdsl.atomic import write_text_atomic
from qdsl.study.precision import precision_table

# (label, recipe under recipes/ or None for fp32)
ROWS = (
    ("fp32", None),
    ("Storti naive W8A8 (per tensor, MSE weights)", "storti/t2_w8a8.qrec"),
    ("Storti W8A8, weights current min-max (Table 1 CMM / CMM)", "storti/t1_cmm_cmm.qrec"),
    ("Storti W8A32 (per-tensor MSE weights, float activations)", "storti/t2_w8a32.qrec"),
    ("  diagnostic: W8A32 with min-max weights", "storti/t2_w8a32_minmax.qrec"),
    ("  diagnostic: W8A32 with per-channel MSE weights", "storti/t2_w8a32_per_channel.qrec"),
    ("Storti W8A16", "storti/t2_w8a16.qrec"),
    ("Storti W4A32", "storti/t2_w4a32.qrec"),
    ("Storti W8A8, res_sum at 16 bits", "storti/t3_res_sum.qrec"),
    ("  diagnostic: W8A8, both residual sums at 16 bits", "storti/t3_res_both.qrec"),
    ("Storti W8A8, PEG K = 8", "storti/t4_w8a8_k8.qrec"),
    ("Storti W8A8, per-token activations", "storti/t4_w8a8_per_token.qrec"),
    ("Wei W8A8 dynamic, per-tensor", "wei/t4_dynamic_per_tensor.qrec"),
    ("Wei W8A8 static, per-tensor", "wei/t4_static_per_tensor.qrec"),
    ("Wei W8A8 static, per-column", "wei/t4_static_per_column.qrec"),
    ("Wei W4A8 static, per-column", "wei/t5_w4a8.qrec"),
    ("Wei W8A4 static, per-column", "wei/t5_w8a4.qrec"),
)
_BLOCK = re.compile(r"(<!-- qdsl:headline -->\n)(.*?)(<!-- /qdsl:headline -->)", re.S)
_FINDINGS = re.compile(r"(<!-- qdsl:findings-headline -->\n)(.*?)(<!-- /qdsl:findings-headline -->)",
                       re.S)
_PRECISION = re.compile(r"(<!-- qdsl:precision -->\n)(.*?)(<!-- /qdsl:precision -->)", re.S)
MODELS = {"smol": "SmolLM2-135M", "qwen": "Qwen2.5-Coder-0.5B", "gpt2": "stdlib-gpt2"}


def rows_by_recipe(res: dict) -> dict[str | None, dict]:
    """recipe under recipes/ (None = fp32) -> its measured row, over every seed table
    in the sweep's results.json (recipes that mean the same share one job, so the
    row's own ``recipe`` field may name the file that ran; the table's is used)."""
    from qdsl.study.tables import TABLES

    out: dict = {}
    for name, rows in res["tables"].items():
        if name not in TABLES:
            continue
        for row, measured in zip(TABLES[name].rows, rows):
            if "es" in measured:
                before = out.get(row.recipe, {})
                out[row.recipe] = {**before, **measured, "vs_float": {
                    **before.get("vs_float", {}), **measured.get("vs_float", {})}}
    return out


def _num(x, digits=1) -> str:
    if x is None:
        return "-"
    return f"{x:.1e}" if x >= 1e5 else f"{x:,.{digits}f}"


def quality(run: dict | None, ppl_only: bool = False) -> str:
    if run is None:
        return "-"
    if ppl_only:
        return _num(run.get("ppl"), 2)
    d = (run.get("vs_float") or {}).get("es")
    es = _num(run["es"]) + (f" ({d['est']:+.1f} [{d['lo']:+.1f}, {d['hi']:+.1f}])" if d else "")
    return f"{es} / {run['em']:.0f} / {_num(run.get('ppl'))}"


def pass1(run: dict | None) -> str:
    he = (run or {}).get("humaneval")
    if not he:
        return "-"
    d = ((run or {}).get("vs_float") or {}).get("pass@1")
    return f"{100 * he['pass@1']:.1f}" + (f" ({d['est']:+.1f} [{d['lo']:+.1f}, {d['hi']:+.1f}])"
                                          if d else "")


def table(smol: dict, qwen: dict, gpt2: dict, n: dict) -> str:
    he_n = next((r["humaneval"]["problems"] for r in qwen.values() if "humaneval" in r), None)
    head = ["recipe", f"SmolLM2-135M ES (diff [95% CI]) / EM / ppl (n={n['smol']})",
            f"Qwen2.5-Coder-0.5B ES (diff [95% CI]) / EM / ppl (n={n['qwen']})"]
    if he_n:
        head.append(f"Qwen HumanEval pass@1 % (diff [95% CI]; first {he_n})")
    head.append("stdlib-gpt2 ppl")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, recipe in ROWS:
        cells = [label, quality(smol.get(recipe)), quality(qwen.get(recipe))]
        if he_n:
            cells.append(pass1(qwen.get(recipe)))
        cells.append(quality(gpt2.get(recipe), ppl_only=True))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def findings_table(large: dict, small: dict) -> str:
    """The findings the headline sweep (``large``) decides, one line each, beside the
    verdict over the base sweep (``small``); the rest are listed by name."""
    from qdsl.study.findings import NOT_RUN, VERDICTS
    from qdsl.study.report import findings_of

    base = {(f["paper"], f["claim"]): f for f in findings_of(small)}
    decided = findings_of(large)
    got = [f for f in decided if f["verdict"] != NOT_RUN]
    rest = [f for f in decided if f["verdict"] == NOT_RUN]
    counts = {v: sum(f["verdict"] == v for f in got) for v in VERDICTS if v != NOT_RUN}
    out = [f"Decided over the headline sweep's {large['n_samples']:,} samples per row "
           f"({large['config']['ppl_windows']} perplexity windows), the same checks and margins "
           f"as the findings block above: " + ", ".join(f"{k}: {v}" for k, v in counts.items())
           + f"; beside each, the verdict over {small['n_samples']:,} samples "
           f"({small['config']['ppl_windows']} windows).", "",
           "| claim | table | verdict | measured | at n = "
           f"{small['n_samples']:,} |", "|---|---|---|---|---|"]
    for f in got:
        b = base.get((f["paper"], f["claim"]))
        before = b["verdict"] if b else "-"
        changed = " (changed)" if b and before != f["verdict"] else ""
        out.append(f"| {f['claim']} | {f['table']} | **{f['verdict']}** | {f['evidence']} "
                   f"| {before}{changed} |")
    if rest:
        out += ["", "Not decided at this n (a row they need is not in the headline sweep): "
                + "; ".join(f"*{f['claim']}* ({f['evidence'].removeprefix('needs ')})"
                            for f in rest) + "."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--doc", default="docs/results.md")
    ap.add_argument("--smol", default="results/sweep-smollm2-n1572")
    ap.add_argument("--base", default="results/sweep",
                    help="the SmolLM2 sweep of every table (the page's own), for the findings")
    ap.add_argument("--qwen", default="results/sweep-qwen")
    ap.add_argument("--gpt2", default="results/sweep-stdlib-gpt2")
    a = ap.parse_args(argv)
    dirs = {"smol": Path(a.smol), "qwen": Path(a.qwen), "gpt2": Path(a.gpt2)}
    results = {k: json.loads((d / "results.json").read_text()) for k, d in dirs.items()}
    runs = {k: rows_by_recipe(r) for k, r in results.items()}
    n = {k: r["n_samples"] for k, r in results.items()}
    doc = Path(a.doc)
    text = doc.read_text()
    if not _BLOCK.search(text):
        raise SystemExit(f"{doc}: no <!-- qdsl:headline --> ... <!-- /qdsl:headline --> block")
    body = table(runs["smol"], runs["qwen"], runs["gpt2"], n)
    text = _BLOCK.sub(lambda m: m.group(1) + body + m.group(3), text)
    if _PRECISION.search(text):
        prec = "\n".join(precision_table(MODELS[k], [(label, runs[k].get(recipe))
                                                     for label, recipe in ROWS if recipe])
                         for k in MODELS)
        text = _PRECISION.sub(lambda m: m.group(1) + prec + m.group(3), text)
    if _FINDINGS.search(text):
        small = json.loads((Path(a.base) / "results.json").read_text())
        body = findings_table(results["smol"], small)
        text = _FINDINGS.sub(lambda m: m.group(1) + body + m.group(3), text)
    write_text_atomic(doc, text)
    print(f"wrote the headline table of {doc}")


if __name__ == "__main__":
    main()
