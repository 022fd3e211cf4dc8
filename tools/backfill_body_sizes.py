"""Add the body's storage (without the embeddings and lm_head) to sweep cache entries
that predate recording it, from the recipe's plan alone (capture, name, match: no
calibration, no evaluation), so the tables can print the compression both ways.

An entry is filled only when its recipe file still compiles to the plan that ran (the
same recipe hash) and the plan's whole-model storage equals the entry's recorded
`size_before` / `size_after`. Entries recorded before d69dc58 (a tied tensor stored
once per distinct spec: a float embedding and an 8-bit lm_head are two copies) or
07a9576 (a Conv1D weight's scales per output channel) carry sizes of the older formula:
they are listed, and with `--fix-sizes` their whole-model sizes are recomputed too (the
entry then says so in `sizes_from`). Anything else is listed and left alone. Each entry
is rewritten atomically; entries that have the field are skipped, so a re-run is cheap.

    .venv/bin/python tools/backfill_body_sizes.py --fix-sizes results/sweep-qwen results/sweep
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qdsl.atomic import write_json_atomic
from qdsl.compiler.build import student_of
from qdsl.graph.capture import capture
from qdsl.graph.naming import name_graph
from qdsl.lang import load_recipe
from qdsl.plan import build_plan
from qdsl.study.jobs import recipe_path
from qdsl.study.sweepjob import _model
from qdsl.study.tables import storage

FIELDS = ("body_before", "body_after", "body_compression")


def _recipe_file(recorded: str) -> Path | None:
    """The recorded recipe path (often another worktree's) as this checkout's file."""
    p = Path(recorded)
    if p.exists():
        return p
    parts = p.parts
    if "recipes" in parts:
        rel = "/".join(parts[len(parts) - parts[::-1].index("recipes"):])
        q = Path(recipe_path(rel))
        return q if q.exists() else None
    return None


def _todo(dirs: list[Path]) -> dict[str, list[tuple[Path, dict]]]:
    """Entries to fill, by model."""
    out: dict[str, list[tuple[Path, dict]]] = {}
    for d in dirs:
        for f in sorted((d / "cache").glob("*.json")):
            e = json.loads(f.read_text())
            if e.get("compression") is None or all(k in e for k in FIELDS):
                continue
            out.setdefault(e["model"], []).append((f, e))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="sweep output directories")
    ap.add_argument("--fix-sizes", action="store_true",
                    help="recompute the whole-model sizes of entries whose recorded ones "
                         "came from an older storage formula (same recipe hash)")
    args = ap.parse_args(argv)
    filled, fixed, skipped = 0, 0, []
    for model_name, entries in _todo(args.dirs).items():
        model = _model(model_name).model
        named = None
        for f, e in entries:
            if e.get("recipe") is None:   # the float row: nothing quantized
                e.update(body_before=e["size_before"], body_after=e["size_before"],
                         body_compression=1.0)
                write_json_atomic(f, e)
                filled += 1
                continue
            path = _recipe_file(e["recipe"])
            recipe = load_recipe(path) if path else None
            if recipe is None or recipe.hash() != e.get("recipe_hash"):
                skipped.append(f"{f}: {e['recipe']} changed since it ran")
                continue
            _, student = student_of(model, recipe)
            if student is not None:
                skipped.append(f"{f}: a layer-reduced student (not backfilled)")
                continue
            if named is None:
                named = name_graph(capture(model, None, mode="plain"))
            st = storage(model, named, build_plan(recipe, named))
            note = ""
            if (round(st.before) != round(e["size_before"])
                    or round(st.after) != round(e["size_after"])):
                change = (f"recorded {e['size_before']:.0f} / {e['size_after']:.0f} bytes, "
                          f"the plan's {st.before:.0f} / {st.after:.0f}")
                if not args.fix_sizes or round(st.before) != round(e["size_before"]):
                    skipped.append(f"{f}: {change}")
                    continue
                note = f" (sizes recomputed: {change})"
                e.update(size_after=st.after, size_mb=st.after / 1e6,
                         compression=st.compression,
                         sizes_from="recomputed from the plan by tools/backfill_body_sizes.py "
                                    f"({change})")
                fixed += 1
            e.update(body_before=st.body_before, body_after=st.body_after,
                     body_compression=st.body_compression)
            write_json_atomic(f, e)
            filled += 1
            print(f"{f.name}  {Path(e['recipe']).name}: {st.compression:.2f}x / "
                  f"{st.body_compression:.2f}x{note}", flush=True)
    print(f"filled {filled} entries ({fixed} with recomputed sizes); left {len(skipped)}")
    for s in skipped:
        print("  " + s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
