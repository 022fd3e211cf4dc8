"""The seed papers' tables, and their markdown rendering.

The tables are data: ``[[table]]`` entries of the seed files
(``qdsl/study/data/*.toml``, read by ``qdsl.study.seeds``). A table is a named list
of rows; a row is a label, the recipe file that reproduces it (relative to the
shipped ``recipes/`` directory; None = the float baseline) and the paper's numbers
for that row. ``qdsl sweep --table storti-3``
runs exactly the recipes of one table; ``render`` lays a table out as the paper
does, with our measured numbers and the paper's side by side.

Paper numbers: Storti 2023 (seed 000) Tables 1-4 report ES / EM (CodeGPT, py150);
Wei et al. 2023 (seed 002) report HumanEval pass@1 (%), Table 4 for CodeGen-350M,
Table 5 for CodeGen-2B, Table 7 the %drop under character-level perturbation
(CodeGen-350M, HumanEval / MBPP).
"""

from __future__ import annotations

import logging
import math
import os
import platform
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import write_json_atomic, write_text_atomic
from ..errors import QdslError
from ..lang.parser import did_you_mean
from .findings import evaluate, render as render_findings
from .jobs import HUMANEVAL, ROBUST, Job
from .paired import OLD_CACHE, fmt, metric_diff, pct_drop_diff, ppl_test, vs_float
from .plots import write_plots
from .seeds import table_specs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    label: str
    recipe: str | None          # "storti/t1_mse_cmm.qrec"; None = float baseline
    paper: dict = field(default_factory=dict)  # {"ES": 41, "EM": 17} as printed
    lower: str | None = None    # "int8": compile with real lowering (and run qdsl bench)
    own_calib: bool = False     # keeps its recipe's calibration size under --calib-samples
    # a recipe that compiles to the same plan (tests/test_seed_equivalents.py checks it):
    # the row shares that recipe's job instead of running its own copy
    runs_as: str | None = None


@dataclass(frozen=True)
class Table:
    name: str                   # "storti-1"
    title: str
    kind: str                   # "quality" | "robust" | "calib"
    rows: tuple[Row, ...]
    paper_cols: tuple[str, ...] = ("ES", "EM")
    humaneval: bool = False     # HumanEval jobs without a paper pass@1 column (loose recipes)

    def recipes(self) -> list[str]:
        return [r.recipe for r in self.rows if r.recipe]

    @property
    def pass1(self) -> bool:
        """Whether the table's rows get HumanEval jobs under ``--humaneval``."""
        return self.humaneval or "pass@1" in self.paper_cols


def _row(spec: dict, cols: tuple[str, ...]) -> Row:
    """A ``[[table]]`` row of a seed file: a paper column it lacks is null (no such
    row in the paper), before the row's other printed numbers."""
    printed = spec.get("paper", {})
    paper = {c: printed.get(c) for c in cols} | printed
    return Row(spec["label"], spec.get("recipe"), paper, spec.get("lower"),
               spec.get("own_calib", False), spec.get("runs_as"))


def _table(spec: dict) -> Table:
    cols = tuple(spec.get("paper_cols", ("ES", "EM")))
    return Table(spec["name"], spec["title"], spec["kind"],
                 tuple(_row(r, cols) for r in spec["rows"]), cols)


# every seed table, in the order of the seed files (qdsl/study/data/*.toml)
TABLES: dict[str, Table] = {t.name: t for t in map(_table, table_specs())}


def get_table(name: str) -> Table:
    """The seed table ``name``; a ``QdslError`` naming the tables when there is none."""
    if name not in TABLES:
        hint = did_you_mean(name, list(TABLES))
        raise QdslError(f"unknown table {name!r}" + (f"; {hint}" if hint else "")
                        + f" (tables: {', '.join(TABLES)}, all)")
    return TABLES[name]


# ------------------------------------------------------------------ rendering


def _f(x, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _with_diff(value: str, res: dict, base: dict | None, metric: str) -> str:
    """'41.1 (-0.9 [-2.3, +0.5])': the value and its paired difference from the float
    row with the 95% CI (ES: t interval; EM / pass@1: Newcombe); the value alone for the
    float row itself, or where the rows cannot be paired (no per-sample scores)."""
    if base is None or res is base or value == "-":
        return value
    d = metric_diff(res, base, metric)
    return f"{value} ({fmt(d, 0 if metric == 'em' else 1)})" if d is not None else value


def _ppl_cell(res: dict, base: dict | None) -> str:
    """'11.69 (x1.170 [1.100, 1.240])'; 'no CI (old cache)' without per-window losses."""
    ppl = _f(res.get("ppl"), 2)
    if base is None or res is base or res.get("ppl") is None or base.get("ppl") is None:
        return ppl
    p = ppl_test(res, base)
    return f"{ppl} ({fmt(p, 3, ratio=True)})" if p is not None else f"{ppl}, {OLD_CACHE}"


def _pass1(res: dict | None, base: dict | None = None) -> str:
    """Measured HumanEval pass@1 (%), the problem count and the paired difference from
    the float row: '31.1 of 164 (-7.3 [-15.9, +1.2])'."""
    he = (res or {}).get("humaneval")
    if not he:
        return "-"
    value = f"{100 * he['pass@1']:.1f} of {he['problems']}"
    bhe = (base or {}).get("humaneval")
    if not bhe or res is base:
        return value
    d = metric_diff(res, base, "pass@1")
    return f"{value} ({fmt(d)})" if d is not None else value


def _quality_line(row: Row, res: dict | None, base: dict | None, cols) -> list[str]:
    paper = [_f(row.paper.get(c)) for c in cols]
    if res is None:
        return [row.label, "-", "(not run yet)", "", "", "", "", *paper]
    size = res.get("size_mb")
    return [row.label, res.get("bits", "fp32"), _with_diff(_f(res["es"]), res, base, "es"),
            _with_diff(_f(res["em"], 0), res, base, "em"), _ppl_cell(res, base),
            _compression_cell(res), _f(size, 1), *paper]


def _compression_cell(res: dict) -> str:
    """'2.43x / 3.98x': the whole model's ratio, then its body's (without the embeddings
    and lm_head; '-' where the cache entry predates recording it)."""
    comp, body = res.get("compression"), res.get("body_compression")
    if not comp:
        return "-"
    return f"{comp:.2f}x / " + (f"{body:.2f}x" if body else "-")


def _robust_line(row: Row, res: dict | None, base: dict | None, cols) -> list[str]:
    paper = [_f(row.paper.get(c), 2) for c in cols]
    r = (res or {}).get("robust")
    if not r:
        return [row.label, "(not run yet)", "", "", "", "", "", *paper]
    drop = _f(r["es_drop_pct"], 2)
    r0 = (base or {}).get("robust")
    if r0 and r is not r0 and r.get("es_drop_pct") is not None:
        d = pct_drop_diff(r, r0)
        drop += f" ({fmt(d)})" if d is not None else " (no per-sample scores)"
    return [row.label, _f(r["es"]), _f(r["es_perturbed"]), drop,
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
        head = ["Model", "ES", "ES pert.", "%drop ES (diff vs float [95% CI])", "EM",
                "EM pert.", "%drop EM", *[f"paper %drop ({c})" for c in table.paper_cols]]
        lines = [_robust_line(r, results.get(r.recipe), base, table.paper_cols)
                 for r in table.rows]
    else:
        head = ["Method", "bits", "ES (diff [95% CI])", "EM (diff [95% CI])",
                "ppl (ratio [95% CI])", "compression (model / body)", "MB",
                *[f"paper {c}" for c in table.paper_cols]]
        lines = [_quality_line(r, results.get(r.recipe), base, table.paper_cols)
                 for r in table.rows]
        if any("humaneval" in (results.get(r.recipe) or {}) for r in table.rows):
            head.insert(-len(table.paper_cols) or len(head), "pass@1 % (diff [95% CI])")
            for line, r in zip(lines, table.rows):
                line.insert(-len(table.paper_cols) or len(line),
                            _pass1(results.get(r.recipe), base))
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


def storage(model, named, plan):
    """Estimated parameter bytes of ``plan`` over the SOURCE model's parameters
    (``qdsl.compiler.render.storage`` reads the graph, whose quantized weights
    ``lower_fake`` has replaced), tied tensors counted once: a ``Storage`` (the whole
    model and its body, without the embeddings and lm_head)."""
    from ..compiler.render import storage_of  # imports torch (see machine)

    params = dict(model.named_parameters(remove_duplicate=False))

    def source(target: str):  # graph target "model.model.layers.0..." -> the model's tensor
        parts = target.split(".")
        return next((params[".".join(parts[i:])] for i in range(len(parts))
                     if ".".join(parts[i:]) in params), None)

    return storage_of(named, plan, source, model.parameters())


# ------------------------------------------------------------------ sweep reports


def adhoc_table(recipes: list[str], humaneval: bool = False) -> Table:
    """The table of recipe files named on the command line; a pass@1 table (its rows get
    HumanEval jobs) with ``humaneval`` (``--humaneval``)."""
    rows = [Row("Baseline (fp32)", None)]
    rows += [Row(Path(r).stem, str(Path(r).resolve())) for r in recipes]
    return Table("recipes", "Recipes named on the command line", "quality", tuple(rows), (),
                 humaneval)


def _summary(res: dict) -> dict:
    """A cached job result without its per-sample rows and per-layer detail."""
    out = {k: v for k, v in res.items()
           if k not in ("samples", "layers", "robust", "traceback", "ppl_window_nll",
                        "ppl_window_tokens")}
    if "humaneval" in out:  # pass@1 and counts, not the 164 completions
        out["humaneval"] = {k: v for k, v in out["humaneval"].items() if k != "results"}
    return out


def machine() -> dict:
    """The machine a sweep reports: CPU, cores, torch and Python versions, load."""
    import torch  # not at the top: the sweep command imports this module to parse its arguments

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
    out = {}
    for r in table.rows:
        q = done.get(keys.get(Job.of(r)))
        if q is not None:
            q = dict(q)
            rob = done.get(keys.get(Job.of(r, ROBUST)))
            if rob is not None:
                q["robust"] = _with_clean_scores(rob["robust"], q.get("samples"))
            he = done.get(keys.get(Job.of(r, HUMANEVAL)))
            if he is not None and table.pass1:
                q["humaneval"] = he["humaneval"]   # with its per-problem results
            out[r.recipe] = q
    return out


def write_all(out, meta: dict, tables, keys: dict, done: dict, failed: dict, *,
              wall: float) -> dict:
    """Rewrite DIR/results.json, DIR/tables.md, DIR/findings.md and DIR/plots/ from the
    finished jobs."""
    out = Path(out)
    res_tables, full_tables, md = {}, {}, []
    for t in tables:
        results = table_results(t, keys, done)
        full_tables[t.name] = [{"label": r.label, "recipe": r.recipe,
                                **results.get(r.recipe, {})} for r in t.rows]
        res_tables[t.name] = [{"label": r.label, "recipe": r.recipe, "paper": r.paper,
                               **({"robust": results[r.recipe]["robust"]}
                                  if r.recipe in results and "robust" in results[r.recipe]
                                  else {}),
                               **_summary(results.get(r.recipe, {})),
                               **({"vs_float": vs_float(results[r.recipe], results.get(None))}
                                  if r.recipe in results and r.recipe is not None else {})}
                              for r in t.rows]
        md.append(render(t, results))
    findings = evaluate(full_tables)  # per-sample scores: not in results.json's rows
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
            f"match (%), compression = estimated fp32 / quantized parameter bytes, of the "
            f"whole model / of its body (without the embeddings and lm_head, which most "
            f"recipes keep float: the body's ratio is the one a paper's nominal 'W8 = 4x' "
            f"compares with). In "
            f"parentheses: the paired difference from the float row with its 95% CI over "
            f"the same samples (ES: paired t interval; EM, pass@1: Newcombe's paired score "
            f"interval, points; perplexity: the ratio from paired per-window log-losses, "
            f"'{OLD_CACHE}' where the cache predates recording them).\n\n")
    fails = "".join(f"- FAILED {v.get('kind')} {v.get('recipe')}: {v.get('error')}\n"
                    for v in failed.values())
    write_text_atomic(out / "tables.md", head + "\n".join(md) + ("\n" + fails if fails else ""))
    write_text_atomic(out / "findings.md", "# Seed findings: verdicts\n\n"
                      + render_findings(findings, meta["n_samples"]))
    try:
        write_plots(out / "plots", tables, keys, done)
    except Exception as e:  # a plot must never lose a sweep's results
        log.warning("plots failed: %s: %s", type(e).__name__, e)
    return obj
