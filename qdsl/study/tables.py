"""The seed papers' tables as data, and their markdown rendering.

A table is a named list of rows; a row is a label, the recipe file that
reproduces it (relative to the shipped ``recipes/`` directory; None = the float
baseline) and the paper's numbers for that row. ``qdsl sweep --table storti-3``
runs exactly the recipes of one table; ``render`` lays a table out as the paper
does, with our measured numbers and the paper's side by side.

Paper numbers: Storti 2023 (seed 000) Tables 1-4 report ES / EM (CodeGPT, py150);
Wei et al. 2023 (seed 002) report HumanEval pass@1 (%), Table 4 for CodeGen-350M,
Table 5 for CodeGen-2B, Table 7 the %drop under character-level perturbation
(CodeGen-350M, HumanEval / MBPP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Row:
    label: str
    recipe: str | None          # "storti/t1_mse_cmm.qrec"; None = float baseline
    paper: dict = field(default_factory=dict)  # {"ES": 41, "EM": 17} as printed
    lower: str | None = None    # "int8": compile with real lowering (and run qdsl bench)
    own_calib: bool = False     # keeps its recipe's calibration size under --calib-samples


@dataclass(frozen=True)
class Table:
    name: str                   # "storti-1"
    title: str
    kind: str                   # "quality" | "robust" | "calib"
    rows: tuple[Row, ...]
    paper_cols: tuple[str, ...] = ("ES", "EM")

    def recipes(self) -> list[str]:
        return [r.recipe for r in self.rows if r.recipe]


def _s(label, recipe, es, em, **kw):
    return Row(label, recipe, {"ES": es, "EM": em, **kw})


_BASE = _s("Baseline (fp32)", None, 41, 17)
_ST = "storti/"
TABLES: dict[str, Table] = {t.name: t for t in (
    Table("storti-1", "Storti 2023 Table 1: range estimators (weights / activations), W8A8",
          "quality", (
              _s("None / None", None, 41, 17),
              _s("MSE / CMM", _ST + "t1_mse_cmm.qrec", 38, 16),
              _s("MSE / RMM", _ST + "t1_mse_rmm.qrec", 38, 16),
              _s("CMM / CMM", _ST + "t1_cmm_cmm.qrec", 38, 14),
              _s("RMM / CMM", _ST + "t1_rmm_cmm.qrec", 38, 14),
              _s("CMM / RMM (grid, not in paper)", _ST + "t1_cmm_rmm.qrec", None, None),
              _s("RMM / RMM (grid, not in paper)", _ST + "t1_rmm_rmm.qrec", None, None))),
    Table("storti-2", "Storti 2023 Table 2: naive PTQ", "quality", (
        _s("Baseline", None, 41, 17, Compression="1x"),
        _s("W8A8", _ST + "t2_w8a8.qrec", 38, 16, Compression="4x"),
        _s("W8A32", _ST + "t2_w8a32.qrec", 40, 17, Compression="4x"),
        _s("W8A16", _ST + "t2_w8a16.qrec", 40, 17, Compression="4x"),
        _s("W4A32", _ST + "t2_w4a32.qrec", 36, 14, Compression="8x"),
        _s("W4A16", _ST + "t2_w4a16.qrec", 36, 14, Compression="8x"),
        _s("W8A32, weights min-max (diagnostic, not in paper)", _ST + "t2_w8a32_minmax.qrec",
           None, None),
        _s("W8A32, weights per channel (diagnostic, not in paper)",
           _ST + "t2_w8a32_per_channel.qrec", None, None))),
    Table("storti-3", "Storti 2023 Table 3: mixed precision (one activation kept at 16 bits), "
          "W8A8", "quality", (
              _BASE,
              _s("Naive W8A8", _ST + "t2_w8a8.qrec", 38, 16),
              _s("Naive W8A16", _ST + "t2_w8a16.qrec", 40, 17),
              _s("First Layer Normalization (Input FFN)", _ST + "t3_ln_1.qrec", 37, 15),
              _s("Second Layer Normalization", _ST + "t3_ln_2.qrec", 37, 16),
              _s("Residual Sum of attn", _ST + "t3_res_attn.qrec", 38, 16),
              _s("Residual Sum of block", _ST + "t3_res_sum.qrec", 40, 17),
              _s("Query x Key", _ST + "t3_attn_scores.qrec", 37, 16),
              _s("Softmax", _ST + "t3_attn_probs.qrec", 37, 15),
              _s("weights_output x value", _ST + "t3_attn_context.qrec", 38, 16),
              _s("Attention projection layer", _ST + "t3_attn_out.qrec", 37, 16),
              _s("MLP fully connected layer", _ST + "t3_mlp_c_fc.qrec", 37, 16),
              _s("MLP projection layer (Output FFN)", _ST + "t3_mlp_c_proj.qrec", 38, 17),
              _s("Input and Output of FFN", _ST + "t3_ffn_in_out.qrec", 37, 17),
              _s("Input and Residual Sum of FFN", _ST + "t3_ffn_in_res.qrec", 39, 16),
              _s("Output and Residual Sum of FFN", _ST + "t3_ffn_out_res.qrec", 39, 17),
              _s("Both residual sums (diagnostic, not in paper)", _ST + "t3_res_both.qrec",
                 None, None))),
    Table("storti-4", "Storti 2023 Table 4: per-embedding-group (PEG) activations", "quality", (
        _BASE,
        _s("Naive W8A8", _ST + "t4_w8a8_per_tensor.qrec", 38, 16),
        _s("Naive W4A32", _ST + "t2_w4a32.qrec", 38, 16),
        _s("W8A8 K = 2", _ST + "t4_w8a8_k2.qrec", 38, 16),
        _s("W8A8 K = 4", _ST + "t4_w8a8_k4.qrec", 38, 17),
        _s("W8A8 K = 8", _ST + "t4_w8a8_k8.qrec", 40, 17),
        _s("W8A8 K = 2 permuted", _ST + "t4_w8a8_k2_permuted.qrec", 39, 17),
        _s("W8A8 K = 4 permuted", _ST + "t4_w8a8_k4_permuted.qrec", 40, 17),
        _s("W4A32 K = 8 permuted", _ST + "t4_w4a32_k8_permuted.qrec", 36, 14),
        _s("W8A8 per-tensor (read as per-token)", _ST + "t4_w8a8_per_token.qrec", 40, 17))),
    Table("wei-4", "Wei et al. 2023 Table 4: dynamic vs static activations, per-tensor vs "
          "per-column weights, W8A8 (paper: CodeGen-350M, HumanEval pass@1 %)", "quality", (
              Row("Full precision", None, {"pass@1": 11.71}),
              Row("Dynamic (per-tensor)", "wei/t4_dynamic_per_tensor.qrec", {"pass@1": 11.77}),
              Row("Static (per-tensor)", "wei/t4_static_per_tensor.qrec", {"pass@1": 10.79}),
              Row("Static (per-column)", "wei/t4_static_per_column.qrec", {"pass@1": 11.83})),
          paper_cols=("pass@1",)),
    Table("wei-5", "Wei et al. 2023 Table 5: precision (static per-column) "
          "(paper: CodeGen-2B, HumanEval pass@1 %)", "quality", (
              Row("Full precision", None, {"pass@1": 20.91}),
              Row("W8A8", "wei/t5_w8a8.qrec", {"pass@1": 22.50}),
              Row("W4A8", "wei/t5_w4a8.qrec", {"pass@1": 18.54}),
              Row("W8A4", "wei/t5_w8a4.qrec", {"pass@1": 0.61})),
          paper_cols=("pass@1",)),
    Table("wei-7", "Wei et al. 2023 Table 7: %drop under character-level perturbation of "
          "comments and docstrings (paper: CodeGen-350M, Ch column, HumanEval / MBPP)",
          "robust", (
              Row("FP", None, {"HumanEval": 10.53, "MBPP": 13.56}),
              Row("D (T)", "wei/t4_dynamic_per_tensor.qrec", {"HumanEval": 15.79, "MBPP": 17.72}),
              Row("S (C)", "wei/t4_static_per_column.qrec", {"HumanEval": 22.73, "MBPP": 14.91}),
              Row("S (T)", "wei/t4_static_per_tensor.qrec", {"HumanEval": 33.33, "MBPP": 13.16})),
          paper_cols=("HumanEval", "MBPP")),
    Table("int8", "Real lowering (qdsl compile --lower int8): quality and hosting metrics "
          "(cf. Wei et al. Table 2)", "hosting", (
              Row("fp32", None),
              Row("W8A8 dynamic (int8 GEMM)", "int8/w8a8_dynamic.qrec", lower="int8"),
              Row("W8 weight-only", "int8/w8_weight_only.qrec", lower="int8"),
              Row("W4 group 64 (packed)", "int8/w4_group64.qrec", lower="int8")),
          paper_cols=()),
    Table("wei-fig7", "Wei et al. 2023 Fig. 7: calibration-set size (static per-column W8A8; "
          "paper: 500..5k samples, accuracy stable)", "calib", (
              Row("Full precision", None),
              Row("32 windows", "wei/fig7_calib_32.qrec", own_calib=True),
              Row("128 windows", "wei/fig7_calib_128.qrec", own_calib=True),
              Row("512 windows", "wei/fig7_calib_512.qrec", own_calib=True),
              Row("2048 windows", "wei/fig7_calib_2048.qrec", own_calib=True)), paper_cols=()),
)}


def get_table(name: str) -> Table:
    from ..errors import QdslError

    if name not in TABLES:
        from ..lang.parser import did_you_mean

        hint = did_you_mean(name, list(TABLES))
        raise QdslError(f"unknown table {name!r}" + (f"; {hint}" if hint else "")
                        + f" (tables: {', '.join(TABLES)}, all)")
    return TABLES[name]


# ------------------------------------------------------------------ rendering


def _f(x, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _signed(x) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:+.1f}"


def _diff(res: dict, base: dict | None, field: str) -> float | None:
    """``res[field] - base[field]``; None when either is missing (null: not measured)."""
    a, b = res.get(field), (base or {}).get(field)
    return None if a is None or b is None else a - b


def _pass1(res: dict | None) -> str:
    """Measured HumanEval pass@1 (%) and the problem count: '31.1 (of 164)'."""
    he = (res or {}).get("humaneval")
    return f"{100 * he['pass@1']:.1f} (of {he['problems']})" if he else "-"


def _quality_line(row: Row, res: dict | None, base: dict | None, cols) -> list[str]:
    paper = [_f(row.paper.get(c)) for c in cols]
    if res is None:
        return [row.label, "-", "(not run yet)", "", "", "", "", "", "", *paper]
    d_es = _diff(res, base, "es") if row.recipe else None
    d_em = _diff(res, base, "em") if row.recipe else None
    comp = res.get("compression")
    size = res.get("size_mb")
    return [row.label, res.get("bits", "fp32"), _f(res["es"]), _f(res["em"]), _signed(d_es),
            _signed(d_em), _f(res.get("ppl"), 2), f"{comp:.2f}x" if comp else "-",
            _f(size, 1), *paper]


def _robust_line(row: Row, res: dict | None, cols) -> list[str]:
    paper = [_f(row.paper.get(c), 2) for c in cols]
    r = (res or {}).get("robust")
    if not r:
        return [row.label, "(not run yet)", "", "", "", "", "", *paper]
    return [row.label, _f(r["es"]), _f(r["es_perturbed"]), _f(r["es_drop_pct"], 2),
            _f(r["em"]), _f(r["em_perturbed"]), _f(r["em_drop_pct"], 2), *paper]


def _hosting_cells(res: dict | None) -> list[str]:
    """Real artifact size and ``qdsl bench`` numbers (the artifact's row, fp32's row)."""
    bench = (res or {}).get("bench") or {}
    if "skipped" in bench:
        return ["-", f"skipped: {bench['skipped'][:120]}", "", "", "", "", ""]
    rows = {r["kind"]: r for r in bench.get("rows", [])}
    art, fp, ao = rows.get("artifact", {}), rows.get("fp32", {}), rows.get("torch-ao", {})
    size = (res or {}).get("artifact_bytes")
    return [_f(size / 1e6 if size else None), _f(art.get("decode_ms"), 2),
            _f(fp.get("decode_ms"), 2), _f(ao.get("decode_ms"), 2),
            _f(art.get("prefill_ms"), 1), _f(fp.get("prefill_ms"), 1),
            _f(art.get("peak_rss_mb"), 0)]


def render(table: Table, results: dict[str | None, dict]) -> str:
    """Markdown for one table. ``results``: recipe (None = baseline) -> result dict."""
    base = results.get(None)
    if table.kind == "robust":
        head = ["Model", "ES", "ES pert.", "%drop ES", "EM", "EM pert.", "%drop EM",
                *[f"paper %drop ({c})" for c in table.paper_cols]]
        lines = [_robust_line(r, results.get(r.recipe), table.paper_cols) for r in table.rows]
    else:
        head = ["Method", "bits", "ES", "EM", "ΔES", "ΔEM", "ppl", "compression", "MB",
                *[f"paper {c}" for c in table.paper_cols]]
        lines = [_quality_line(r, results.get(r.recipe), base, table.paper_cols)
                 for r in table.rows]
        if any("humaneval" in (results.get(r.recipe) or {}) for r in table.rows):
            head.insert(-len(table.paper_cols) or len(head), "pass@1 %")
            for line, r in zip(lines, table.rows):
                line.insert(-len(table.paper_cols) or len(line), _pass1(results.get(r.recipe)))
        if table.kind == "hosting":
            head += ["artifact MB", "decode ms/tok", "fp32 decode", "torch.ao decode",
                     "prefill ms", "fp32 prefill", "peak RSS MB"]
            for line, r in zip(lines, table.rows):
                line += _hosting_cells(results.get(r.recipe))
        if table.kind == "calib":
            head.insert(2, "calib windows")
            for line, r in zip(lines, table.rows):
                res = results.get(r.recipe) or {}
                line.insert(2, str(res.get("calib_samples", "-")) if r.recipe else "-")
    done = sum(1 for r in table.rows if results.get(r.recipe) is not None
               and (table.kind != "robust" or results[r.recipe].get("robust")))
    status = "" if done == len(table.rows) else f" **(partial: {done}/{len(table.rows)} rows)**"
    out = [f"### {table.name}: {table.title}{status}", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------ row columns


def describe_bits(plan) -> str:
    """'W8A8', or the majority widths plus the exceptions: 'W8A8 (+A16 x30)'."""
    from collections import Counter

    w = Counter(e.weight.bits or 32 for e in plan.entries if e.weight is not None)
    a = Counter(e.activation.bits or 32 for e in plan.entries if e.activation is not None)
    parts, extra = [], []
    for prefix, c in (("W", w), ("A", a)):
        if not c:
            continue
        main = c.most_common(1)[0][0]
        parts.append(f"{prefix}{main}")
        extra += [f"{prefix}{b} x{k}" for b, k in sorted(c.items()) if b != main]
    return "".join(parts) + (f" (+{', '.join(extra)})" if extra else "")


def storage(model, named, plan) -> tuple[float, float]:
    """Estimated parameter bytes (before, after) of ``plan`` over the SOURCE model's
    parameters (``qdsl.compiler.render.storage`` reads the graph, whose quantized weights
    ``lower_fake`` has replaced), tied tensors counted once."""
    from ..compiler.render import storage_of

    params = dict(model.named_parameters(remove_duplicate=False))

    def source(target: str):  # graph target "model.model.layers.0..." -> the model's tensor
        parts = target.split(".")
        return next((params[".".join(parts[i:])] for i in range(len(parts))
                     if ".".join(parts[i:]) in params), None)

    st = storage_of(named, plan, source, model.parameters())
    return st.before, st.after


# ------------------------------------------------------------------ sweep reports


def recipe_path(recipe: str) -> str:
    """A table's recipe (relative to the shipped recipes/) or a user's path -> a path."""
    from pathlib import Path

    from ..resources import data_dir

    p = Path(recipe)
    return str(p) if p.is_absolute() or p.exists() else str(data_dir("recipes") / recipe)


def adhoc_table(recipes: list[str]) -> Table:
    """The table of recipe files named on the command line."""
    from pathlib import Path

    rows = [Row("Baseline (fp32)", None)]
    rows += [Row(Path(r).stem, str(Path(r).resolve())) for r in recipes]
    return Table("recipes", "Recipes named on the command line", "quality", tuple(rows), ())


def _summary(res: dict) -> dict:
    """A cached job result without its per-sample rows and per-layer detail."""
    out = {k: v for k, v in res.items() if k not in ("samples", "layers", "robust", "traceback")}
    if "humaneval" in out:  # pass@1 and counts, not the 164 completions
        out["humaneval"] = {k: v for k, v in out["humaneval"].items() if k != "results"}
    return out


def machine() -> dict:
    import os
    import platform

    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "load_avg": os.getloadavg()}


def _with_clean_scores(robust: dict, samples: list[dict] | None) -> dict:
    """The robust result with each perturbed sample's clean ES (``es_clean``), taken from
    the quality job's per-sample scores where the robust job predates recording it:
    greedy decoding of the same model on the same prompt gives the same prediction."""
    ps = robust.get("perturbed_samples") or []
    if not samples or all("es_clean" in x for x in ps):
        return robust
    clean = {x["id"]: x["es"] for x in samples}
    if any(x["id"] not in clean for x in ps):
        return robust
    return {**robust, "perturbed_samples": [{**x, "es_clean": x.get("es_clean", clean[x["id"]])}
                                            for x in ps]}


def table_results(table: Table, keys: dict, done: dict) -> dict:
    """recipe (None = baseline) -> the quality result, with the robust job's numbers
    under "robust" for a robust table and the HumanEval job's under "humaneval"."""
    from .sweep import Job

    out = {}
    for r in table.rows:
        q = done.get(keys.get(Job.of(r)))
        if q is not None:
            q = dict(q)
            rob = done.get(keys.get(Job.of(r, "robust")))
            if rob is not None:
                q["robust"] = _with_clean_scores(rob["robust"], q.get("samples"))
            he = done.get(keys.get(Job.of(r, "humaneval")))
            if he is not None and "pass@1" in table.paper_cols:
                q["humaneval"] = _summary(he)["humaneval"]
            out[r.recipe] = q
    return out


def write_all(out, meta: dict, tables, keys: dict, done: dict, failed: dict, *,
              wall: float) -> dict:
    """Rewrite DIR/results.json, DIR/tables.md, DIR/findings.md and DIR/plots/ from the
    finished jobs."""
    import time
    from pathlib import Path

    from .plots import write_plots
    from ..atomic import write_json_atomic, write_text_atomic

    out = Path(out)
    res_tables, md = {}, []
    for t in tables:
        results = table_results(t, keys, done)
        res_tables[t.name] = [{"label": r.label, "recipe": r.recipe, "paper": r.paper,
                               **({"robust": results[r.recipe]["robust"]}
                                  if r.recipe in results and "robust" in results[r.recipe]
                                  else {}),
                               **_summary(results.get(r.recipe, {}))} for r in t.rows]
        md.append(render(t, results))
    from .findings import evaluate, render as render_findings

    findings = evaluate(res_tables, meta["n_samples"])
    runs = {k: _summary(v) for k, v in done.items() if k in set(keys.values())}
    job_seconds = sum(v.get("seconds") or 0 for v in runs.values())
    obj = {**meta, "machine": machine(), "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
           "wall_seconds_this_run": round(wall, 1),
           "job_seconds_total": round(job_seconds, 1),
           "tables": res_tables, "findings": findings, "runs": runs,
           "failed": {k: {"recipe": v.get("recipe"), "kind": v.get("kind"),
                          "error": v.get("error")} for k, v in failed.items()}}
    write_json_atomic(out / "results.json", obj)
    cfg = meta["config"]
    head = (f"# qdsl sweep: {cfg['model']} on bench {cfg['bench']}\n\n"
            f"{meta['n_samples']} completion samples (seed {cfg['bench_seed']}), "
            f"{cfg['ppl_windows']} perplexity windows, prompt budget {cfg['ctx_tokens']} tokens; "
            f"calibration {cfg['calib']}, {cfg['calib_default']} windows of "
            f"{cfg['calib_seq_len']} tokens unless the recipe sets its own. Compute so far: "
            f"{job_seconds / 60:.1f} min of jobs. ES = edit similarity (0-100), EM = exact "
            f"match (%), compression = estimated fp32 / quantized parameter bytes.\n\n")
    fails = "".join(f"- FAILED {v.get('kind')} {v.get('recipe')}: {v.get('error')}\n"
                    for v in failed.values())
    write_text_atomic(out / "tables.md", head + "\n".join(md) + ("\n" + fails if fails else ""))
    write_text_atomic(out / "findings.md", "# Seed findings: verdicts\n\n"
                      + render_findings(findings, meta["n_samples"]))
    try:
        write_plots(out / "plots", tables, keys, done)
    except Exception as e:  # a plot must never lose a sweep's results
        import logging
        logging.getLogger(__name__).warning("plots failed: %s: %s", type(e).__name__, e)
    return obj
