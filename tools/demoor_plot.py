"""de Moor et al. Figure 1 from `qdsl train` runs: the training loss (XTC's total
distillation loss, a running mean over --window steps, thin: every step) and the
held-out loss (the `--eval-every` evaluations) against the step, one colour per row,
plus the learning rate, and, for runs that recorded it, the fraction of 1-bit weights
whose sign each step flipped (running mean). Reads each run directory's `ckpt/state.json` (safetensors +
JSON checkpoints; nothing else is needed), writes a PNG (matplotlib: an optional
dependency, imported here only).

    python tools/demoor_plot.py -o docs/figures/demoor-loss.png \
        1W8A=runs/demoor/1w8a.run 2L=runs/demoor/2l.run 1W8A2L=runs/demoor/1w8a2l.run

Also prints, per run, the mean training loss of each tenth of the run (the plateau
check the results page quotes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def history(run: Path) -> dict:
    for d in ("ckpt", "ckpt.old"):
        f = run / d / "state.json"
        if f.is_file():
            return json.loads(f.read_text(encoding="utf-8"))
    sys.exit(f"{run}: no checkpoint (expected {run / 'ckpt' / 'state.json'})")


def running_mean(xs: list[float], w: int) -> list[float]:
    out, s = [], 0.0
    for i, x in enumerate(xs):
        s += x
        if i >= w:
            s -= xs[i - w]
        out.append(s / min(i + 1, w))
    return out


def tenths(xs: list[float]) -> list[float]:
    n = len(xs)
    return [sum(xs[i * n // 10:(i + 1) * n // 10]) / max(1, (i + 1) * n // 10 - i * n // 10)
            for i in range(10)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="LABEL=RUN_DIR")
    ap.add_argument("-o", "--out", required=True, help="PNG (or .svg) to write")
    ap.add_argument("--window", type=int, default=25, help="running-mean steps (25)")
    a = ap.parse_args()
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("the plot needs matplotlib (pip install matplotlib)")
    runs = [(spec.split("=", 1)[0], history(Path(spec.split("=", 1)[1]))) for spec in a.runs]
    flips = any("flips" in h for _, st in runs for h in st["history"])
    fig, axes = plt.subplots(3 if flips else 2, 1, figsize=(8, 8.5 if flips else 6.5),
                             sharex=True, gridspec_kw={"height_ratios": [3, 1, 1.3][:3 if flips else 2]})
    ax, lr_ax = axes[0], axes[1]
    for i, (label, st) in enumerate(runs):
        steps = [h["step"] for h in st["history"]]
        loss = [h["loss"] for h in st["history"]]
        c = f"C{i}"
        ax.plot(steps, loss, color=c, alpha=0.2, lw=0.6)
        ax.plot(steps, running_mean(loss, a.window), color=c, lw=1.6,
                label=f"{label}: train ({st['tokens']:,} tokens, {st['seconds'] / 60:.0f} min)")
        ev = st.get("evals", [])
        if ev:
            ax.plot([e["step"] for e in ev], [e["loss"] for e in ev], "o--", color=c, ms=3,
                    lw=1, label=f"{label}: held-out")
        lr_ax.plot(steps, [h["lr"] for h in st["history"]], color=c, lw=1.2, label=label)
        if flips and all("flips" in h for h in st["history"]):
            axes[2].plot(steps, running_mean([h["flips"] for h in st["history"]], a.window),
                         color=c, lw=1.2, label=label)
        if flips and any("frozen" in h for h in st["history"]):   # `set train.freeze`
            axes[2].plot(steps, [h.get("frozen", 0.0) for h in st["history"]], ":", color=c,
                         lw=1.2, label=f"{label}: fraction frozen")
        print(f"{label}: training loss by tenths of {len(loss)} steps: "
              + ", ".join(f"{v:.3f}" for v in tenths(loss)))
        if ev:
            print(f"{label}: held-out loss " + ", ".join(
                f"{e['step']}:{e['loss']:.3f}" for e in ev))
    ax.set_yscale("log")
    ax.set_ylabel("XTC distillation loss (log)")
    ax.set_title("qdsl train on stdlib-gpt2 (de Moor et al. 2023, Figure 1)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    lr_ax.set_ylabel("learning rate")
    lr_ax.grid(alpha=0.3)
    if flips:
        axes[2].set_ylabel("1-bit sign flips\nper step (fraction)")
        axes[2].set_yscale("log")
        axes[2].legend(fontsize=7)
        axes[2].grid(alpha=0.3, which="both")
    axes[-1].set_xlabel("optimizer step (8 x 128 tokens)")
    fig.tight_layout()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(a.out).with_name(Path(a.out).stem + ".tmp" + Path(a.out).suffix)
    fig.savefig(tmp, dpi=110)
    tmp.replace(a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
