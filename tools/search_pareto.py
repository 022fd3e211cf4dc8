"""Pareto plot of qdsl search's found recipes against uniform ones: parameter storage
against the perplexity ratio to fp32, with 95% CIs.

    python tools/search_pareto.py \
        --found "found at W8A8 size=F8.eval.json" --uniform "W8A8 static=U8.eval.json" \
        --found "found at W4-g64 size=F4.eval.json@10.471" \
        --uniform "W4-g64=U4.eval.json@recipes/uniform_w4g64.qrec" \
        --title "stdlib-gpt2" -o docs/search_pareto_stdlib-gpt2.png

Each EVAL.json is `qdsl eval ART --json` of one compiled recipe with its float baseline
(an artifact's default): the y value is the perplexity ratio to that fp32 baseline from
the paired per-window log-loss, exp(mean(nll_q - nll_fp32)) with its 95% t interval
(`qdsl.study.stats.ppl_ratio`), so every row needs `--ppl-windows` > 1. Rows should be
evaluated with the same --n, --seed and --ppl-windows (the tool refuses rows whose
windows differ: their ratios would not be comparable).

The size (MB, 10^6 bytes, the parameter storage `qdsl search` budgets and `qdsl explain`
counts): after `@`, a number, or a recipe to count (`qdsl.compiler.render.storage` on
the model, `--model` or the eval's baseline); without `@`, the recipe of the artifact the
eval names (its recipe.qrec and source model), if that directory still exists.
Found rows are circles, uniform rows squares. Prints a markdown table of the rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qdsl.study.stats import ppl_ratio  # noqa: E402


class RowError(ValueError):
    """A row the tool cannot use, and why (printed as one line)."""


def _eval(path: Path, need_baseline: bool = True) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RowError(f"{path}: unreadable eval JSON: {e}") from e
    for role in ("target", "baseline") if need_baseline else ("target",):
        r = d.get(role)
        if not isinstance(r, dict) or not r.get("ppl_window_nll"):
            raise RowError(f"{path}: no per-window perplexity for the {role} (run `qdsl eval "
                           "ART --ppl-windows N --json` with N > 1 on an artifact, whose "
                           "baseline is its fp32 source, or give --fp32)")
    return d


def fp32_row(path: Path) -> dict:
    """The fp32 rows of ``path``: its baseline, or its target where it has no baseline
    (`qdsl eval MODEL --json` of the float model itself)."""
    d = _eval(path, need_baseline=False)
    return d["baseline"] if isinstance(d.get("baseline"), dict) else d["target"]


_MODELS: dict[str, object] = {}


def recipe_mb(recipe: str | Path, model: str) -> float:
    """The parameter storage of ``recipe`` on ``model`` in MB, as `qdsl explain` counts
    it (every float tensor at fp32, each stored once)."""
    from qdsl.compiler.build import explain
    from qdsl.compiler.render import storage
    from qdsl.models import zoo

    if model not in _MODELS:
        _MODELS[model] = zoo.load_model(model)[0]
    e = explain(str(recipe), _MODELS[model])
    return storage(e.captured.gm, e.named, e.plan).after / 1e6


def size_of(spec: str | None, d: dict, model: str | None, where: str,
            base: Path = Path(".")) -> tuple[float, str]:
    """(MB, where it came from) of a row (see the module docstring)."""
    if spec:
        try:
            return float(spec), "given"
        except ValueError:
            pass
        if not Path(spec).is_file():
            raise RowError(f"{where}: @{spec} is neither a size in MB nor a recipe file")
        base = d["baseline"] if isinstance(d.get("baseline"), dict) else None
        if not (model or base):
            raise RowError(f"{where}: give --model to count @{spec} (the eval has no baseline)")
        return recipe_mb(spec, model or base["model"]), spec
    art = Path(str(d["target"].get("model", "")))
    if not art.is_absolute() and not art.exists():   # relative to where eval ran
        art = base / art
    meta = art / "qdsl_artifact.json"
    if not meta.is_file():
        raise RowError(f"{where}: the artifact it evaluated ({art}) is not here: give the "
                       "size (NAME=EVAL.json@MB) or the recipe (NAME=EVAL.json@RECIPE.qrec)")
    src = model or json.loads(meta.read_text())["model"]["id"]
    return recipe_mb(art / "recipe.qrec", src), str(art / "recipe.qrec")


def rows_of(found: list[str], uniform: list[str], model: str | None,
            fp32: dict | None = None) -> list[dict]:
    """``fp32``: the float rows for evals run with `--no-baseline` (``fp32_row``); an
    eval's own baseline is used where it has one."""
    rows, windows = [], None
    for kind, specs in (("found", found), ("uniform", uniform)):
        for spec in specs:
            if "=" not in spec:
                raise RowError(f"--{kind} {spec!r}: expected NAME=EVAL.json[@MB|@RECIPE]")
            name, rest = spec.split("=", 1)
            path, _, size = rest.partition("@")
            d = _eval(Path(path), need_baseline=fp32 is None)
            t = d["target"]
            b = d["baseline"] if isinstance(d.get("baseline"), dict) else fp32
            if len(t["ppl_window_nll"]) != len(b["ppl_window_nll"]):
                raise RowError(f"{path}: target and baseline have different windows")
            key = (len(b["ppl_window_nll"]), tuple(b.get("ppl_window_tokens") or ()))
            if windows is not None and key != windows:
                raise RowError(f"{path}: other perplexity windows than the rows before it "
                               "(evaluate every row with the same --n, --seed, --ppl-windows)")
            windows = key
            r = ppl_ratio(t["ppl_window_nll"], b["ppl_window_nll"])
            mb, src = size_of(size or None, d, model, f"--{kind} {name}",
                              Path(path).parent)
            rows.append({"name": name, "kind": kind, "mb": mb, "size_from": src,
                         "ratio": r.est, "lo": r.lo, "hi": r.hi, "windows": r.n,
                         "ppl": t["ppl"], "fp32_ppl": b["ppl"], "es": t.get("es"),
                         "n": t.get("n")})
    if not rows:
        raise RowError("no rows: give --found and / or --uniform")
    return rows


def table(rows: list[dict]) -> str:
    out = ["| recipe | kind | MB | perplexity (fp32) | ppl ratio vs fp32 [95% CI] | windows |",
           "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['name']} | {r['kind']} | {r['mb']:.3f} | {r['ppl']:.3f} "
                   f"({r['fp32_ppl']:.3f}) | {r['ratio']:.4f} [{r['lo']:.4f}, {r['hi']:.4f}] "
                   f"| {r['windows']} |")
    return "\n".join(out)


def plot(rows: list[dict], out: str | Path, title: str = "") -> None:
    """Size against perplexity ratio, CI bars; found circles, uniform squares. Written
    atomically (a temporary file, then renamed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qdsl.atomic.files import atomic_path

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    style = {"found": ("o", "tab:red", "found by qdsl search"),
             "uniform": ("s", "tab:blue", "uniform recipe")}
    seen = set()
    for r in rows:
        marker, color, label = style[r["kind"]]
        ax.errorbar(r["mb"], r["ratio"], yerr=[[r["ratio"] - r["lo"]], [r["hi"] - r["ratio"]]],
                    fmt=marker, color=color, capsize=3, markersize=7,
                    label=None if r["kind"] in seen else label)
        seen.add(r["kind"])
        up = r["kind"] == "uniform"   # uniform labels above left, found below right
        ax.annotate(r["name"], (r["mb"], r["ratio"]), fontsize=8,
                    xytext=(-7, 5) if up else (7, -11), textcoords="offset points",
                    ha="right" if up else "left")
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8, label="fp32")
    span = max(r["mb"] for r in rows) - min(r["mb"] for r in rows)
    pad = max(span * 0.15, 0.02 * max(r["mb"] for r in rows))
    ax.set_xlim(min(r["mb"] for r in rows) - 2.5 * pad, max(r["mb"] for r in rows) + 2.5 * pad)
    ax.set_xlabel("parameter storage (MB, 10^6 bytes)")
    ax.set_ylabel("perplexity / fp32 perplexity (95% CI)")
    n = rows[0]["windows"]
    ax.set_title(f"{title + ': ' if title else ''}size vs perplexity ratio ({n} windows)",
                 fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out, suffix=".tmp" + Path(out).suffix) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--found", action="append", default=[], metavar="NAME=EVAL.json[@MB|@RECIPE]")
    ap.add_argument("--uniform", action="append", default=[],
                    metavar="NAME=EVAL.json[@MB|@RECIPE]")
    ap.add_argument("--model", help="the model a recipe's size is counted on (default: the "
                                    "eval's baseline)")
    ap.add_argument("--fp32", metavar="EVAL.json",
                    help="fp32 per-window losses for rows evaluated with `qdsl eval "
                         "--no-baseline` (this file's baseline, or its target if it has none); "
                         "same --n, --seed, --ppl-windows")
    ap.add_argument("--title", default="", help="e.g. the model's name")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    ap.add_argument("-o", "--out", required=True, help="the plot (.png / .svg)")
    args = ap.parse_args(argv)
    try:
        fp32 = fp32_row(Path(args.fp32)) if args.fp32 else None
        rows = rows_of(args.found, args.uniform, args.model, fp32)
    except RowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(rows))
    plot(rows, args.out, args.title)
    if args.json:
        from qdsl.atomic.files import write_json_atomic
        write_json_atomic(args.json, rows)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
