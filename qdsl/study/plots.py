"""Sweep plots (matplotlib, Agg backend), written to ``DIR/plots/``:

* ``pareto.png``: ES against estimated model size for every finished recipe, the
  Pareto front (no other point is both smaller and better) drawn and labelled;
* ``act_max.png``: per block, the float model's maximum |activation| over the
  layer-statistics windows (Wei et al. Fig. 6b), residual sums and linear outputs;
* ``act_error.png``: per block, the relative error ||q - f|| / ||f|| of the block
  output (residual sum closing the block) against fp32 on one fixed input (Fig. 6c);
* ``calib.png``: ES and perplexity against calibration windows (Fig. 7), when those rows ran.
"""

from __future__ import annotations

import re
from pathlib import Path

from .jobs import Job

_BLOCK = re.compile(r"^block\.(\d+)\.(.+)$")


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (size, quality) on the front: smaller size, higher quality.

    >>> pareto_front([(1.0, 5.0), (2.0, 4.0), (3.0, 6.0), (0.5, 1.0)])
    [3, 0, 2]
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _label_of(tables, keys, done) -> dict[str, str]:
    """Job key -> a short label (the first table row naming its recipe)."""
    out: dict[str, str] = {}
    for t in tables:
        for r in t.rows:
            k = keys.get(Job.of(r))
            if k in done and k not in out:
                out[k] = "fp32" if r.recipe is None else Path(r.recipe).stem
    return out


def plot_pareto(runs: dict[str, dict], labels: dict[str, str], path: Path) -> None:
    plt = _plt()
    keys = [k for k in runs if runs[k].get("size_mb") and runs[k].get("es") is not None]
    if not keys:
        return
    pts = [(runs[k]["size_mb"], runs[k]["es"]) for k in keys]
    front = pareto_front(pts)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=18, color="0.6", label="recipe")
    fx = [pts[i] for i in front]
    ax.plot([p[0] for p in fx], [p[1] for p in fx], "-o", color="tab:red", ms=5,
            label="Pareto front")
    for i in front:
        ax.annotate(labels.get(keys[i], keys[i][:6]), pts[i], fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("estimated parameter storage (MB)")
    ax.set_ylabel("edit similarity (ES)")
    ax.set_title("Quality against model size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _per_block(layers: dict, field: str, suffix: str | None = None) -> dict[int, list[float]]:
    """block -> values of ``field`` over that block's layers (only ``suffix`` if given)."""
    out: dict[int, list[float]] = {}
    for name, d in layers.items():
        m = _BLOCK.match(name)
        if not m or (suffix and m.group(2) != suffix):
            continue
        v = d.get(field)
        out.setdefault(int(m.group(1)), []).extend(v if isinstance(v, list) else [v])
    return out


def plot_act_max(float_layers: dict, path: Path) -> None:
    """Box per block: max |x| of each recorded layer in each window (Fig. 6b)."""
    plt = _plt()
    per = _per_block(float_layers, "max_abs_windows")
    if not per:
        return
    blocks = sorted(per)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.boxplot([per[b] for b in blocks], positions=blocks, widths=0.6, showfliers=True)
    res = _per_block(float_layers, "max_abs_windows", "res_sum")
    if res:
        ax.plot(blocks, [max(res.get(b, [0])) for b in blocks], "-", color="tab:red", lw=1,
                label="block output (res_sum), max over windows")
        ax.legend(fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("block")
    ax.set_ylabel("max |activation| (fp32)")
    ax.set_title("Maximum activation magnitude per layer (cf. Wei et al. Fig. 6b)")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_act_error(series: dict[str, dict], path: Path) -> None:
    """One line per recipe: relative error of each block's output vs fp32 (Fig. 6c)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    drawn = 0
    for label, layers in series.items():
        per = _per_block(layers, "rel_err", "res_sum")
        if not per:
            continue
        blocks = sorted(per)
        ax.plot(blocks, [100 * per[b][0] for b in blocks], "-o", ms=3, label=label)
        drawn += 1
    if drawn:
        ax.set_yscale("log")
        ax.set_xlabel("block")
        ax.set_ylabel("relative error of block output vs fp32 (%)")
        ax.set_title("Error accumulation with depth (cf. Wei et al. Fig. 6c)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_calib(points: list[tuple[int, float, float | None]], base: dict | None,
               path: Path) -> None:
    """ES and perplexity against calibration windows, each axis from 0 so that a flat
    line looks flat (a zoomed axis drew 55.9 -> 55.6 ES as a fall)."""
    plt = _plt()
    if not points:
        return
    points = sorted(points)
    x = [p[0] for p in points]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, i, key, ylabel in ((axes[0], 1, "es", "edit similarity (ES)"),
                               (axes[1], 2, "ppl", "perplexity")):
        y = [p[i] for p in points]
        if any(v is None for v in y):
            ax.set_visible(False)
            continue
        ax.plot(x, y, "-o", label="static per-column W8A8")
        ref = (base or {}).get(key)
        if ref is not None:
            ax.axhline(ref, ls=":", color="k", label="fp32")
        ax.set_ylim(0, 1.15 * max(y + ([ref] if ref is not None else [])))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("calibration windows")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Calibration-set size (cf. Wei et al. Fig. 7)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Recipes drawn in act_error.png when present (Wei Table 4 and the Storti extremes);
# otherwise the first few finished recipes.
_ERROR_SERIES = ("t4_dynamic_per_tensor", "t4_static_per_tensor", "t4_static_per_column",
                 "t2_w8a8", "t3_res_sum", "t4_w8a8_k8", "t2_w4a32", "t5_w8a4")


def write_plots(out: Path, tables, keys: dict, done: dict) -> None:
    """Every plot the finished jobs allow (quality jobs only)."""
    out.mkdir(parents=True, exist_ok=True)
    labels = _label_of(tables, keys, done)
    runs = {k: done[k] for k in labels if done[k].get("kind") == "quality"}
    plot_pareto(runs, labels, out / "pareto.png")
    base = done.get(keys.get(Job(None)))
    if base and base.get("layers"):
        plot_act_max(base["layers"], out / "act_max.png")
    with_layers = {labels[k]: r["layers"] for k, r in runs.items()
                   if r.get("layers") and r.get("recipe")}
    chosen = {n: with_layers[n] for n in _ERROR_SERIES if n in with_layers}
    plot_act_error(chosen or dict(list(with_layers.items())[:6]), out / "act_error.png")
    plot_calib(calib_points(tables, keys, runs), base, out / "calib.png")


def calib_points(tables, keys: dict, runs: dict) -> list[tuple[int, float, float | None]]:
    """(windows, ES, perplexity) of each finished row of a calibration-size table, found
    by its job: Fig. 7's 512-window row shares wei-4's per-column job and label."""
    fig7 = [keys.get(Job.of(r)) for t in tables if t.kind == "calib" for r in t.rows if r.recipe]
    return [(r["calib_samples"], r["es"], r.get("ppl")) for k in dict.fromkeys(fig7)
            if (r := runs.get(k)) and r.get("calib_samples")]
