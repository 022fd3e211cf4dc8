"""Rows of docs/results-demoor.md from `qdsl eval --json` files: size on disk, ES with
the paired t 95% CI of the difference against the float model (the eval's baseline,
same samples), EM with Newcombe's paired interval (McNemar, the study's standard), perplexity with the CI of its ratio to the float model's (paired
per-window log-loss, ``study.stats.ppl_ratio``), and the training record of the run directory.

Size is given two ways, each against the float model's same files (``--float``): the
weight files (``*.safetensors``: what de Moor's sizes count) and every file of the
directory (tokenizer, plan and metadata included, 0.6 MB for stdlib-gpt2).

    python tools/demoor_table.py [--float models/stdlib-gpt2] LABEL=ARTIFACT:EVAL.json[:RUN_DIR] ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qdsl.artifact.store import artifact_size  # noqa: E402
from qdsl.study.paired import es_diff, metric_diff, ppl_test  # noqa: E402


def weight_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors"))


def row(label: str, spec: str, ref: tuple[int, int]) -> str:
    """One table row; ``ref``: the float model's (weight bytes, all bytes)."""
    parts = spec.split(":")
    art, ev = Path(parts[0]), json.loads(Path(parts[1]).read_text())
    run = Path(parts[2]) if len(parts) > 2 else None
    t, b = ev["target"], ev["baseline"]        # the eval scores both on the same samples
    es = es_diff(t, b)
    em = metric_diff(t, b, "em")               # Newcombe's paired interval, points
    pr = ppl_test(t, b)                        # same windows, paired log-loss
    train = "-"
    if run is not None and (run / "ckpt" / "state.json").is_file():
        st = json.loads((run / "ckpt" / "state.json").read_text())
        last = st["evals"][-1] if st.get("evals") else {}
        train = (f"{st['step']} steps, {st['tokens']:,} tok, {st['seconds'] / 60:.1f} min, "
                 f"held-out KD loss {last.get('loss', float('nan')):.3f} / CE {last.get('ce', float('nan')):.3f}")
    if (art / "model.safetensors").is_file():
        w, d = weight_bytes(art), artifact_size(art)
        size = f"{w / 1e6:.2f} ({ref[0] / w:.1f}x) | {d / 1e6:.2f} ({ref[1] / d:.1f}x)"
    else:   # a simulation artifact: its weights are the source model's, not in the directory
        size = "source model's | source model's"
    return (f"| {label} | {size} "
            f"| {t['es']:.2f} | {es.est:+.2f} [{es.lo:+.2f}, {es.hi:+.2f}] "
            f"| {t['em']:.1f} | {em.est:+.1f} [{em.lo:+.1f}, {em.hi:+.1f}] "
            f"| {t['ppl']:.1f} ({pr.est:.3f} [{pr.lo:.3f}, {pr.hi:.3f}]) "
            f"| {es.n} | {train} |")


def main() -> None:
    args, ref = sys.argv[1:], Path("models/stdlib-gpt2")
    if args[:1] == ["--float"]:
        ref, args = Path(args[1]), args[2:]
    sizes = weight_bytes(ref), artifact_size(ref)
    print(f"float: weights {sizes[0] / 1e6:.2f} MB, all files {sizes[1] / 1e6:.2f} MB ({ref})")
    print("| row | weights MB (x smaller) | all files MB (x smaller) | ES | ΔES vs fp32 [95% CI] | EM % | ΔEM [95% CI, Newcombe] | ppl (ratio to fp32 [95% CI]) | n | training |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arg in args:
        label, spec = arg.split("=", 1)
        print(row(label, spec, sizes))


if __name__ == "__main__":
    main()
