"""Two measured rows compared the way the study compares them: paired, with 95% intervals
and a three-way verdict against the study's margins (``qdsl compare``, ``qdsl eval``).

A row is one side of a ``qdsl eval --json`` file: its ``target`` (the model or artifact
evaluated) or its ``baseline`` (the float model scored on the same samples in the same
run); or a sweep's cache entry (``DIR/cache/<key>.json``, one job's row; ``DIR:RECIPE``
names it by its recipe, e.g. ``results/sweep:storti/t2_w8a32`` or ``results/sweep:fp32``).
Two rows pair when they scored the same completion samples (by id), the same
perplexity windows (the same count and tokens per window) and, for pass@1, the same
HumanEval problems; rows that do not pair are an error that says which part differs,
never a comparison of two unpaired means.

For each metric both rows have, ``compare`` gives A - B (ES, EM, pass@1, in points) or
A / B (perplexity) with its interval (``qdsl.study.stats``: t on the paired
differences, a percentile bootstrap beside it for ES, McNemar's exact test with
Newcombe's interval for EM and pass@1, t on the paired per-window log-losses for
perplexity) and two verdicts:

* ``difference``: ``A higher`` / ``A lower`` when the interval excludes no difference,
  else ``not distinguishable``;
* ``margin``: whether A loses at most the margin against B (an equivalence claim, one-
  sided as the study's "near lossless": a gain is no loss): ``within`` when the whole
  interval lies inside the margin, ``beyond`` when it lies wholly outside,
  ``inconclusive`` across it. For ES and perplexity an inconclusive verdict also gives
  ``n_to_decide``: the samples (windows) at which an interval of the same SD around
  the same estimate would clear the boundary, or None where the estimate sits on or
  past it (no n makes it "within").

The margins default to ``qdsl/study/data/margins.toml`` (ES and EM 2 points, pass@1 5,
perplexity 5%).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import QdslError
from .paired import aligned, es_diff, fmt, metric_diff, proportion_test
from .seeds import margins
from .stats import Interval, n_for_halfwidth, ppl_ratio

log = logging.getLogger(__name__)

SIDES = ("target", "baseline")

# what is compared: key, display name, unit of the margin
_POINTS = {"es": "ES", "em": "EM", "pass@1": "pass@1"}
_MARGIN_KEY = {"es": "es", "em": "em", "pass@1": "pass1", "ppl": "ppl_pct"}


class CompareError(QdslError):
    """Rows that cannot be compared: unreadable, not an eval file, or not paired."""


@dataclass(frozen=True)
class Row:
    """One side of an eval file: ``data`` is the row's JSON (samples, windows, ...)."""
    label: str
    data: dict

    @property
    def model(self) -> str:
        return str(self.data.get("model", "?"))


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``FILE`` or ``FILE:target`` / ``FILE:baseline`` -> (file, side or None)."""
    head, sep, tail = spec.rpartition(":")
    if sep and tail in SIDES and head:
        return head, tail
    return spec, None


def _sweep_runs(spec: str) -> tuple[str, str, dict] | None:
    """``DIR:RECIPE`` (a sweep's output directory and one of its recipes: a path suffix
    such as ``storti/t2_w8a32`` or ``t2_w8a32.qrec``, or ``fp32``) -> (DIR, RECIPE,
    DIR/results.json's runs); None when ``spec`` is not of that form."""
    head, sep, name = spec.rpartition(":")
    if not sep or not head or name in SIDES or not (Path(head) / "results.json").is_file():
        return None
    try:
        runs = json.loads((Path(head) / "results.json").read_text(encoding="utf-8"))["runs"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CompareError(f"{head}/results.json: cannot read its runs ({e})") from None
    return head, name, runs


def _of_recipe(runs: dict, name: str, kind: str) -> list[str]:
    """The keys of ``runs`` of ``kind`` whose recipe is ``name`` (a path suffix, or fp32)."""
    want = Path(name if name.endswith(".qrec") or name == "fp32" else name + ".qrec").parts

    def matches(run: dict) -> bool:
        if run.get("kind", "quality") != kind:
            return False
        if not run.get("recipe"):
            return name == "fp32"
        return Path(str(run["recipe"])).parts[-len(want):] == want
    return [k for k, r in runs.items() if isinstance(r, dict) and matches(r)]


def _quality_entry(head: str, name: str, runs: dict) -> str:
    """The cache entry of ``name``'s quality job in the sweep at ``head``; a CompareError
    when the recipe matches no finished job, or several (name its entry then)."""
    keys = _of_recipe(runs, name, "quality")
    if len(keys) != 1:
        have = sorted({Path(str(r.get("recipe"))).stem if r.get("recipe") else "fp32"
                       for r in runs.values() if isinstance(r, dict)})
        raise CompareError(
            f"{head}: {'no' if not keys else len(keys)} finished quality job"
            f"{'s' if len(keys) != 1 else ''} of {name!r}"
            + (f" (name one: {', '.join(f'{head}/cache/{k}.json' for k in keys)})" if keys
               else f"; it has {', '.join(have)}"))
    return str(Path(head) / "cache" / f"{keys[0]}.json")


def _humaneval(head: str, name: str, runs: dict) -> dict | None:
    """``name``'s HumanEval result in the sweep at ``head`` (its HumanEval job's
    ``humaneval``, with the per-problem results), where it ran exactly one; else None."""
    keys = _of_recipe(runs, name, "humaneval")
    if len(keys) != 1:
        if keys:
            log.warning("%s: %d HumanEval jobs of %r; none attached (name the rows by their "
                        "cache entries and compare pass@1 with --json)", head, len(keys), name)
        return None
    try:
        entry = json.loads((Path(head) / "cache" / f"{keys[0]}.json").read_text(encoding="utf-8"))
        return entry["humaneval"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CompareError(f"{head}/cache/{keys[0]}.json: cannot read its HumanEval ({e})") from None


def load_row(spec: str, default_side: str = "target") -> Row:
    """The row ``spec`` names: ``FILE[:target|:baseline]`` of a ``qdsl eval --json``
    file, a sweep's cache entry ``DIR/cache/KEY.json``, or ``DIR:RECIPE`` (the entry of
    the recipe's quality job, carrying its HumanEval job's result where the sweep ran
    one); a CompareError naming the file where it cannot be read or has no such row."""
    found = _sweep_runs(spec)   # results.json read once for both
    he = None
    if found is not None:
        he = _humaneval(*found)
        spec = _quality_entry(*found)
    path, given = parse_spec(spec)
    side = given or default_side
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CompareError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CompareError(f"{path}: cannot read it ({e})") from None
    except json.JSONDecodeError as e:
        raise CompareError(f"{path}: not JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if isinstance(d, dict) and isinstance(d.get("samples"), list) and "key" in d \
            and not any(k in d for k in SIDES):
        if he is not None:   # DIR:RECIPE: the row's HumanEval job, run on the same model
            d = {**d, "humaneval": he}
        return _sweep_row(path, d, given, default_side)
    if not isinstance(d, dict) or not any(isinstance(d.get(s), dict) for s in SIDES):
        raise CompareError(f"{path}: not a `qdsl eval --json` file (no target / baseline "
                           f"row) nor a sweep's cache entry")
    row = d.get(side)
    if not isinstance(row, dict):
        other = "target" if side == "baseline" else "baseline"
        hint = ("" if side == "target" else
                " (the eval ran with --no-baseline)")
        raise CompareError(f"{path}: has no {side} row{hint}; use {path}:{other}")
    if not row.get("samples"):
        raise CompareError(f"{path}:{side}: no per-sample scores (written by an older qdsl?)")
    return Row(f"{path}:{side}", row)


def _sweep_row(path: str, d: dict, side: str | None, default_side: str) -> Row:
    """A sweep's cache entry (``DIR/cache/<key>.json``, one job's row: the same
    per-sample and per-window fields as an eval row) as a Row, labelled with its
    recipe; it has no target / baseline sides, so its float row is another entry."""
    if side is not None or default_side != "target":
        raise CompareError(f"{path}: a sweep's cache entry is one row "
                           f"(no :{side or 'baseline'}); name row B, e.g. the sweep's fp32 entry")
    if not d["samples"]:
        raise CompareError(f"{path}: no per-sample completion scores (a {d.get('kind')} job)")
    what = Path(str(d["recipe"])).stem if d.get("recipe") else "fp32"
    kind = d.get("kind", "quality")
    return Row(f"{path} ({what}{'' if kind == 'quality' else ', ' + str(kind)})", d)


def _pairing(a: Row, b: Row) -> None:
    """A CompareError saying how two rows' completion samples differ, if they do."""
    ia = [s["id"] for s in a.data["samples"]]
    ib = [s["id"] for s in b.data["samples"]]
    if set(ia) != set(ib) or len(ia) != len(ib):
        shared = len(set(ia) & set(ib))
        raise CompareError(
            f"{a.label} and {b.label} scored different completion samples ({len(ia)} and "
            f"{len(ib)}, {shared} shared): evaluate both with the same --bench, --n and "
            f"--seed so that every sample pairs")


def shared(a: Row, b: Row) -> tuple[Row, Row, int]:
    """Both rows restricted to the completion samples (and HumanEval problems) both
    scored, in A's order: for rows evaluated at different --n with the same --seed (the
    draw is prefix-stable, so the smaller row's samples are the larger one's first).
    Perplexity windows are kept only where they are the same; a CompareError where the
    rows share no sample. Returns the rows and the number of samples shared."""
    ids = {s["id"] for s in b.data["samples"]}
    keep = [s["id"] for s in a.data["samples"] if s["id"] in ids]
    if not keep:
        raise CompareError(f"{a.label} and {b.label} share no completion sample (another "
                           f"--bench or --seed?)")
    ks = set(keep)
    he = [(r.data.get("humaneval") or {}).get("results") for r in (a, b)]
    tasks = ({x["task_id"] for x in he[0]} & {x["task_id"] for x in he[1]}
             if all(he) else None)
    out = []
    for r in (a, b):
        d = {**r.data, "samples": [s for s in r.data["samples"] if s["id"] in ks]}
        if tasks is not None:
            d["humaneval"] = {**d["humaneval"], "results": [
                x for x in d["humaneval"]["results"] if x["task_id"] in tasks]}
        out.append(d)
    na, nb = (d.get("ppl_window_nll") for d in out)
    ta, tb = (d.get("ppl_window_tokens") for d in out)
    if not (na and nb and len(na) == len(nb) and ta == tb):
        for d in out:
            d.pop("ppl_window_nll", None)
    for d in out:   # the rows' means over the shared samples, as compare prints them
        d["es"] = sum(s["es"] for s in d["samples"]) / len(d["samples"])
    return Row(a.label, out[0]), Row(b.label, out[1]), len(keep)


def _margin_verdict(iv: Interval, margin: float, lower_is_better: bool = False) -> str:
    """within / beyond / inconclusive for "A loses at most ``margin``" (on the log scale
    for perplexity, where the boundary is log(1 + margin))."""
    if lower_is_better:      # perplexity ratio: a loss is a ratio above the boundary
        return "within" if iv.hi <= margin else "beyond" if iv.lo > margin else "inconclusive"
    return "within" if iv.lo >= -margin else "beyond" if iv.hi < -margin else "inconclusive"


def _difference(iv: Interval, null: float) -> str:
    return "A higher" if iv.lo > null else "A lower" if iv.hi < null else "not distinguishable"


def _es(a: Row, b: Row, margin: float) -> dict:
    iv, boot = es_diff(a.data, b.data), es_diff(a.data, b.data, bootstrap=True)
    out = {"metric": "es", "a": a.data.get("es"), "b": b.data.get("es"), "diff": iv.to_json(),
           "bootstrap": boot.to_json(), "margin": margin, "difference": _difference(iv, 0.0),
           "margin_verdict": _margin_verdict(iv, margin)}
    if out["margin_verdict"] == "inconclusive":
        gap = iv.est + margin        # distance of the estimate above the boundary
        out["n_to_decide"] = n_for_halfwidth(iv.sd or 0.0, gap) if gap > 0 else None
    return out


def _proportion(a: Row, b: Row, metric: str, margin: float) -> dict | None:
    v = aligned([a.data, b.data], metric)
    if v is None:
        if metric == "pass@1" and all((r.data.get("humaneval") or {}).get("results")
                                      for r in (a, b)):
            raise CompareError(f"{a.label} and {b.label} ran different HumanEval problems: "
                               f"evaluate both with the same --humaneval N")
        return None
    t, iv = proportion_test(a.data, b.data, metric), metric_diff(a.data, b.data, metric)
    va = 100 * sum(x > 0 for x in v[0]) / len(v[0])
    vb = 100 * sum(x > 0 for x in v[1]) / len(v[1])
    return {"metric": metric, "a": va, "b": vb, "diff": iv.to_json(),
            "mcnemar": {"b": t.b, "c": t.c, "p_exact": t.p_exact, "p_mid": t.p_mid},
            "margin": margin, "difference": _difference(iv, 0.0),
            "margin_verdict": _margin_verdict(iv, margin)}


def _ppl(a: Row, b: Row, margin_pct: float) -> dict | None:
    na, nb = a.data.get("ppl_window_nll"), b.data.get("ppl_window_nll")
    if not na or not nb:
        return None
    ta, tb = a.data.get("ppl_window_tokens"), b.data.get("ppl_window_tokens")
    if len(na) != len(nb) or (ta and tb and ta != tb):
        raise CompareError(
            f"{a.label} and {b.label} scored different perplexity windows ({len(na)} and "
            f"{len(nb)} windows{'' if len(na) != len(nb) else ', different tokens'}): "
            f"evaluate both with the same --bench, --seed and --ppl-windows")
    iv = ppl_ratio(na, nb)
    bound = 1 + margin_pct / 100
    out = {"metric": "ppl", "a": a.data.get("ppl"), "b": b.data.get("ppl"), "ratio": iv.to_json(),
           "margin": margin_pct, "difference": _difference(iv, 1.0),
           "margin_verdict": _margin_verdict(iv, bound, lower_is_better=True)}
    if out["margin_verdict"] == "inconclusive":
        gap = math.log(bound) - math.log(iv.est)
        out["n_to_decide"] = n_for_halfwidth(iv.sd or 0.0, gap) if gap > 0 else None
    return out


def compare(a: Row, b: Row, margin: dict[str, float] | None = None) -> dict:
    """Every metric both rows have, A against B (module docstring); ``margin`` overrides
    the study's margins by key (``es``, ``em``, ``pass1``, ``ppl_pct``)."""
    m = {**margins(), **(margin or {})}
    for r in (a, b):
        if not r.data.get("samples"):
            raise CompareError(f"{r.label}: no per-sample completion scores to pair")
    _pairing(a, b)
    metrics = [_es(a, b, m["es"])]
    for key in ("em", "pass@1"):
        r = _proportion(a, b, key, m[_MARGIN_KEY[key]])
        if r is not None:
            metrics.append(r)
    r = _ppl(a, b, m["ppl_pct"])
    if r is not None:
        metrics.append(r)
    return {"a": {"row": a.label, "model": a.model, "n": len(a.data["samples"])},
            "b": {"row": b.label, "model": b.model, "n": len(b.data["samples"])},
            "level": 0.95, "metrics": metrics, "execution_differs": execution_differs(a, b)}


# execution fields that change a float model's completions: not its rows per forward
# (its batched completions equal batch 1's, docs/performance.md "Identity")
_FLOAT_INVARIANT = {"batch_size"}


def execution_differs(a: Row, b: Row) -> list[str]:
    """The execution-path fields (``qdsl.eval.complete.execution``) in which two rows of
    the same runner kind differ, as "field A vs B". Equivalent paths of one int8
    artifact (batch 1 or 8, eager or compiled decode) scored 40.2 to 43.0 ES on the same
    samples (docs/performance.md, session 29), so a comparison meant to isolate a
    recipe must hold the path fixed. A float model against a graph (the usual
    quantized-vs-float row) differs in runner by design: only the machine's fields
    (CPU capability, torch, threads) are checked then; between two graphs, also the
    revision of what a compiled model computes (``qdsl.NUMERICS``). Empty when a row
    predates the record."""
    ea, eb = a.data.get("execution"), b.data.get("execution")
    if not isinstance(ea, dict) or not isinstance(eb, dict):
        return []
    kinds = {str(e.get("runner", "")).split(",")[0] for e in (ea, eb)}
    if len(kinds) > 1:
        fields = ("threads", "cpu", "torch")
    else:
        fields = tuple(k for k in ("runner", "batch_size", "threads", "cpu", "torch")
                       if not (kinds == {"transformers"} and k in _FLOAT_INVARIANT))
    out = [f"{k.replace('_', ' ')} {ea.get(k)} vs {eb.get(k)}" for k in fields
           if ea.get(k) != eb.get(k)]
    na, nb = a.data.get("numerics"), b.data.get("numerics")   # qdsl.NUMERICS, where recorded
    if "transformers" not in kinds and None not in (na, nb) and na != nb:
        out.append(f"qdsl numerics {na} vs {nb}")
    return out


def _num(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _verdict_text(r: dict) -> str:
    unit = f"x{1 + r['margin'] / 100:g}" if r["metric"] == "ppl" else f"{r['margin']:g}-point"
    v = r["margin_verdict"]
    # the claim tested is "A loses at most the margin": name the loss, so that a row far
    # above B does not read as "within the margin" of it
    text = {"within": f"loss within the {unit} margin",
            "beyond": f"loss beyond the {unit} margin",
            "inconclusive": f"inconclusive against the {unit} margin"}[v]
    if v == "inconclusive":
        n = r.get("n_to_decide")
        what = "windows" if r["metric"] == "ppl" else "samples"
        if n is not None:
            text += f" (about {n:,} {what} would decide it at this estimate)"
        elif "n_to_decide" in r:
            text += " (the estimate is past the margin: no n puts it within)"
    return f"{r['difference']}; {text}"


def render(result: dict) -> str:
    """The comparison as text: the two rows, then one line per metric."""
    a, b = result["a"], result["b"]
    lines = [f"A  {a['row']}  ({a['model']}, n {a['n']:,})",
             f"B  {b['row']}  ({b['model']}, n {b['n']:,})",
             "paired, 95% intervals:"]
    for r in result["metrics"]:
        if r["metric"] == "ppl":
            iv = Interval(**{k: r["ratio"][k] for k in ("est", "lo", "hi", "n", "method")})
            head = (f"  ppl     A/B {fmt(iv, 3, ratio=True)}  ({_num(r['a'])} vs {_num(r['b'])}; "
                    f"{iv.n} windows)")
        else:
            iv = Interval(**{k: r["diff"][k] for k in ("est", "lo", "hi", "n", "method")})
            name = _POINTS[r["metric"]]
            head = f"  {name:<7} A-B {fmt(iv, 2)}  ({_num(r['a'])} vs {_num(r['b'])}"
            if r["metric"] == "es":
                bs = r["bootstrap"]
                head += (f"; t, SD {r['diff']['sd']:.1f}; bootstrap "
                         f"[{bs['lo']:+.2f}, {bs['hi']:+.2f}])")
            else:
                mc = r["mcnemar"]
                head += f"; McNemar {mc['b']}/{mc['c']}, exact p {mc['p_exact']:.2g})"
        lines.append(head)
        lines.append(f"          {_verdict_text(r)}")
    if result.get("execution_differs"):
        lines.append("note: the rows ran different execution paths (" +
                     "; ".join(result["execution_differs"]) + "): float summation order "
                     "alone has moved one artifact's ES by up to 3 points between such "
                     "paths; hold the path fixed to compare recipes")
    return "\n".join(lines)
