"""How long the runtime takes to load an artifact (``load_artifact_lm``, what ``qdsl
eval`` and ``qdsl bench`` call), in a fresh process per load, models interleaved:

    python tools/load_time.py 3 capture=OLD_ARTIFACT stored=NEW_ARTIFACT

Prints per label the load seconds and the seconds to load + run a first 8-token prefill,
one value per round (imports and the kernel table are before the clock starts).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CHILD = r'''
import sys, time, torch
torch.set_num_threads(1)
from qdsl.compiler.loading import load_artifact_lm
from qdsl.runtime import kernels
kernels.table()
t = time.perf_counter(); lm = load_artifact_lm(sys.argv[1]); a = time.perf_counter() - t
with torch.inference_mode():
    lm.prefill(torch.zeros(1, 8, dtype=torch.long))
print(a, time.perf_counter() - t)
'''


def main() -> None:
    if len(sys.argv) < 3 or not sys.argv[1].isdigit():
        sys.exit(__doc__)
    rows: dict[str, list[tuple[float, float]]] = {}
    for _ in range(int(sys.argv[1])):
        for spec in sys.argv[2:]:
            label, path = spec.split("=", 1)
            out = subprocess.run([sys.executable, "-c", CHILD, path], capture_output=True,
                                 text=True, cwd=Path(__file__).resolve().parents[1])
            if out.returncode != 0:
                sys.exit(f"{label}: {out.stderr[-1500:]}")
            a, b = map(float, out.stdout.split()[-2:])
            rows.setdefault(label, []).append((a, b))
    print("| artifact | load s (rounds) | load + first prefill s |")
    print("|---|---|---|")
    for label, v in rows.items():
        print(f"| {label} | " + ", ".join(f"{a:.2f}" for a, _ in v) + " | "
              + ", ".join(f"{b:.2f}" for _, b in v) + " |")


if __name__ == "__main__":
    main()
