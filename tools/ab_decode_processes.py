"""Paired A/B of compiled decode, one process each: one artifact under two environments,
or two artifacts (``--b-artifact``: e.g. the same recipe with ``set lower.kv_cache = fp16``),
or two checkouts of qdsl (``--a-path`` / ``--b-path``: each side's PYTHONPATH, with its own
``TORCH_EXTENSIONS_DIR`` under it, so each runs its own build of the C++ kernels).

For a setting a process fixes once (``QDSL_HUGE_PAGES``: where the weights live;
``THP_MEM_ALLOC_ENABLE``, read when torch starts) ``tools/ab_compiled_step.py``'s
in-process design cannot be used. This tool alternates child processes (ABBA), each
loading the artifact, compiling its decode step (inductor's cache warm after the first),
prefilling ``--context`` random tokens and timing ``--steps`` decode steps (median
ms/token); the figure is the geometric mean of the per-pair ratios B / A with its 95% t
interval.

    python tools/ab_decode_processes.py ARTIFACT --a-env QDSL_HUGE_PAGES=0 --pairs 6
    python tools/ab_decode_processes.py ARTIFACT --b-artifact ARTIFACT_FP16_CACHE --pairs 8
    python tools/ab_decode_processes.py ARTIFACT --a-path /work/old --b-path . --pairs 8

``--step fused``: both sides decode through ``qdsl.runtime.fused.decode_step`` (the one
C++ call a step of a w8a8 LLaMA artifact, falling back to the compiled step) instead of
the compiled step; the child says which ran.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def child(artifact: str, threads: int, context: int, steps: int, step: str) -> None:
    import torch

    from qdsl.compiler.loading import load_artifact_lm
    from qdsl.runtime.compiled import CompiledStep
    from qdsl.runtime.fused import decode_step
    torch.set_num_threads(threads)
    lm = load_artifact_lm(artifact, max_cache_len=context + steps + 16)
    lm.step = decode_step(lm.gm, "ab") if step == "fused" else CompiledStep(lm.gm, "ab")
    ids = torch.randint(0, 1000, (1, context), generator=torch.Generator().manual_seed(0))
    logits = lm.prefill(ids[:, :8])
    for _ in range(3):
        logits = lm.decode(int(logits.argmax()))
    logits = lm.prefill(ids)
    ms = []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = lm.decode(int(logits.argmax()))
        ms.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({"ms": statistics.median(ms), "moved": lm.step.moved.nbytes,
                      "direct": "fused" if getattr(lm.step, "active", False)
                      else lm.step.direct}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--a-env", default="", help="NAME=VALUE set for A's processes")
    ap.add_argument("--b-env", default="", help="NAME=VALUE set for B's (default: unset)")
    ap.add_argument("--b-artifact", help="B runs this artifact (A: ARTIFACT), same environment")
    ap.add_argument("--a-path", help="A's checkout of qdsl (its PYTHONPATH)")
    ap.add_argument("--b-path", help="B's checkout of qdsl")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--step", choices=("compiled", "fused"), default="compiled",
                    help="the decode step both sides run (default: compiled)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a.artifact, a.threads, a.context, a.steps, a.step)
        return 0
    if not a.a_env and not a.b_env and not a.b_artifact and not (a.a_path or a.b_path):
        ap.error("nothing differs between A and B: give --a-env / --b-env, --b-artifact "
                 "or --a-path / --b-path")
    from qdsl.study.stats import time_ratio

    def env_of(spec: str, path: str | None) -> dict:
        env = dict(os.environ)
        if path:
            path = os.path.abspath(path)
            env["PYTHONPATH"] = path
            env["TORCH_EXTENSIONS_DIR"] = os.path.join(path, ".torch_ext_bench")
        for name in (a.a_env.partition("=")[0], a.b_env.partition("=")[0]):
            if name:
                env.pop(name, None)
        if spec:
            name, _, value = spec.partition("=")
            env[name] = value
        return env

    def run(side: str) -> dict:
        artifact = a.b_artifact if side == "B" and a.b_artifact else a.artifact
        cmd = [sys.executable, __file__, artifact, "--a-env", a.a_env, "--child",
               "--threads", str(a.threads), "--context", str(a.context), "--steps", str(a.steps),
               "--step", a.step]
        out = subprocess.run(cmd, env=env_of(a.a_env if side == "A" else a.b_env,
                                             a.a_path if side == "A" else a.b_path),
                             capture_output=True, text=True, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    ms = {"A": [], "B": []}
    for i in range(a.pairs):
        for side in (("A", "B") if i % 2 == 0 else ("B", "A")):
            r = run(side)
            ms[side].append(r["ms"])
            print(f"pair {i} {side}: {r['ms']:.3f} ms/token (moved {r['moved'] / 1e6:.0f} MB, "
                  f"direct {r['direct']})", file=sys.stderr)
    iv = time_ratio(ms["B"], ms["A"])
    import torch
    b_name = a.b_artifact or a.b_path or a.b_env or "unset"
    print(f"A ({a.a_path or a.a_env or a.artifact}) median {statistics.median(ms['A']):.3f} ms, B ({b_name}) "
          f"median {statistics.median(ms['B']):.3f} ms; B / A {iv.est:.3f} "
          f"[{iv.lo:.3f}, {iv.hi:.3f}] ({iv.n} pairs of processes, "
          f"{torch.backends.cpu.get_cpu_capability()}, {a.threads} thread(s), {a.step} step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
