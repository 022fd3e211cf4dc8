"""Rows of docs/results-demoor.md from `qdsl eval --json` files: size on disk, ES / EM
with the paired t 95% CI of the difference against the float model (the eval's
baseline, same samples), perplexity with the CI of its ratio to the float model's (paired
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
from qdsl.study.stats import paired_t, ppl_ratio  # noqa: E402


def weight_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors"))


def row(label: str, spec: str, ref: Path) -> str:
    parts = spec.split(":")
    art, ev = Path(parts[0]), json.loads(Path(parts[1]).read_text())
    run = Path(parts[2]) if len(parts) > 2 else None
    t, b = ev["target"], ev["baseline"]
    ts = {s["id"]: s for s in t["samples"]}
    pairs = [(ts[s["id"]], s) for s in b["samples"] if s["id"] in ts]
    es = paired_t([a["es"] for a, _ in pairs], [c["es"] for _, c in pairs])
    em = paired_t([100.0 * a["em"] for a, _ in pairs], [100.0 * c["em"] for _, c in pairs])
    pr = ppl_ratio(t["ppl_window_nll"], b["ppl_window_nll"])   # same windows, paired
    # t["em"] is a percentage already, a sample's em a bool
    w, d = weight_bytes(art), artifact_size(art)
    w_ref, d_ref = weight_bytes(ref), artifact_size(ref)
    train = "-"
    if run is not None and (run / "ckpt" / "state.json").is_file():
        st = json.loads((run / "ckpt" / "state.json").read_text())
        last = st["evals"][-1] if st.get("evals") else {}
        train = (f"{st['step']} steps, {st['tokens']:,} tok, {st['seconds'] / 60:.1f} min, "
                 f"held-out KD loss {last.get('loss', float('nan')):.3f} / CE {last.get('ce', float('nan')):.3f}")
    if (art / "model.safetensors").is_file():
        size = f"{w / 1e6:.2f} ({w_ref / w:.1f}x) | {d / 1e6:.2f} ({d_ref / d:.1f}x)"
    else:   # a simulation artifact: its weights are the source model's, not in the directory
        size = "source model's | source model's"
    return (f"| {label} | {size} "
            f"| {t['es']:.2f} | {es.est:+.2f} [{es.lo:+.2f}, {es.hi:+.2f}] "
            f"| {t['em']:.1f} | {em.est:+.1f} [{em.lo:+.1f}, {em.hi:+.1f}] "
            f"| {t['ppl']:.1f} ({pr.est:.3f} [{pr.lo:.3f}, {pr.hi:.3f}]) "
            f"| {len(pairs)} | {train} |")


def main() -> None:
    args, ref = sys.argv[1:], Path("models/stdlib-gpt2")
    if args[:1] == ["--float"]:
        ref, args = Path(args[1]), args[2:]
    print(f"float: weights {weight_bytes(ref) / 1e6:.2f} MB, all files {artifact_size(ref) / 1e6:.2f} MB ({ref})")
    print("| row | weights MB (x smaller) | all files MB (x smaller) | ES | ΔES vs fp32 [95% CI] | EM % | ΔEM [95% CI] | ppl (ratio to fp32 [95% CI]) | n | training |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arg in args:
        label, spec = arg.split("=", 1)
        print(row(label, spec, ref))


if __name__ == "__main__":
    main()
