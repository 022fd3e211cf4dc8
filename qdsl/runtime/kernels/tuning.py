"""The kernel table: for each operation and shape class, the candidate kernels this
CPU may run, and the one chosen.

Shape classes: ``decode`` (M <= 4 activation rows: a GEMV, memory-bound) and
``prefill`` (M > 4: a GEMM, compute-bound).

A candidate is *eligible* where it is not a slow reference path on this capability
(``cpu.Capability``; ``ATEN_CPU_CAPABILITY`` / ``ONEDNN_MAX_CPU_ISA`` cap it):

* ``torch._int_mm`` only with AVX512-VNNI (elsewhere torch runs a scalar loop,
  20x slower than float32 at prefill);
* ``aten._weight_int8pack_mm`` only at decode on AVX-512 (its other paths are scalar);
* bf16 GEMMs only with AVX512-BF16 (emulated otherwise: 3.4x float32 at prefill);
* qdsl's C++ kernels (``cext``) where they built;
* no candidate that keeps a second layout of each weight beside its stored codes
  (``COPIES``: aten's int4 layout, qdsl's packed int8 GEMM layout; built on first use by
  ``impls.derived``), unless ``QDSL_KERNEL_COPIES=1``: the stored codes stay resident for
  the other kernels (decode's GEMVs, the tied embedding's lookups), so such a kernel
  doubles the weight's memory for at most 1.06x here (w8a8 prefill under AVX2, w4
  decode natively; ``qdsl_w4``'s panel GEMM beats the int4 layout at prefill;
  docs/performance.md). The setting is part of the cache key.

``float_gemm`` ("dequantize + float GEMM": integer codes widened to float32, the
scales applied around one float32 GEMM) is always eligible, so there is always a
choice. Among the eligible candidates the table picks by measurement: each
(operation, class) is timed once per machine on SmolLM2-135M's shapes (``TUNE_SHAPES``)
and the result cached as JSON under ``<qdsl cache>/kernels/`` keyed by torch version,
capability, CPU model and threads (``QDSL_KERNEL_AUTOTUNE=0``: no timing, the first eligible
candidate in the rule order below, which the benchmark backs; docs/performance.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from qdsl.atomic.files import write_json_atomic
from qdsl.models import zoo
from qdsl.runtime.kernels import binary, cext, impls
from qdsl.runtime.kernels.cpu import Capability, capability

log = logging.getLogger(__name__)

DECODE_MAX_M = 4
CLASSES = ("decode", "prefill")
FLOAT = "float_gemm"
AUTOTUNE_ENV = "QDSL_KERNEL_AUTOTUNE"
COPIES_ENV = "QDSL_KERNEL_COPIES"
# candidates whose kernel reads a prepacked copy of the weight (kept beside the codes)
COPIES = frozenset({"torch_int4pack_mm", "qdsl_w8a8_gemm"})
CACHE_ENV = "QDSL_KERNEL_CACHE"
# (K, N) timed per class, summed: SmolLM2-135M's MLP up / down projections and a tall
# one (a vocabulary head's shape class: at decode, kernels that split K, not N, fall
# behind; at prefill it is the largest GEMM of a small model)
TUNE_SHAPES = {"decode": ((576, 1536), (1536, 576), (576, 8192)),
               "prefill": ((576, 1536), (1536, 576), (576, 8192))}
TUNE_M = {"decode": 1, "prefill": 128}
# in the cache key: a table timed by an older version of this procedure is timed again
# (2: the packed candidates' float_gemm pays its per-call unpacking, the head shape at
# prefill; version 1 timed float_gemm on a pre-unpacked weight, below its real cost)
TUNING_VERSION = 2

# operation -> candidates in rule order (preferred first); `eligible` filters them
RULES: dict[str, dict[str, tuple[str, ...]]] = {
    "w8a8": {"decode": ("qdsl_w8a8", "torch_int_mm", FLOAT),
             "prefill": ("torch_int_mm", "qdsl_w8a8_gemm", FLOAT, "qdsl_w8a8")},
    "w8": {"decode": ("qdsl_w8", "torch_int8pack_mm", FLOAT),
           "prefill": ("torch_bf16_gemm", FLOAT, "qdsl_w8")},
    "w4": {"decode": ("qdsl_w4", "torch_int4pack_mm", FLOAT),
           "prefill": ("qdsl_w4", FLOAT, "torch_int4pack_mm")},
    "w4a8": {"decode": ("qdsl_w4a8", FLOAT), "prefill": ("qdsl_w4a8", FLOAT)},
    "w1": {"decode": ("qdsl_w1", FLOAT), "prefill": ("qdsl_w1", FLOAT)},
    "w1a8": {"decode": ("qdsl_w1a8_gemm", "qdsl_w1a8", FLOAT),
             "prefill": ("qdsl_w1a8_gemm", "qdsl_w1a8", FLOAT)},
    "embedding_int8": {"decode": ("torch_gather",), "prefill": ("torch_gather",)},
}
OPS = tuple(RULES)
# what each candidate is, in words (qdsl bench, explain)
DESCRIPTIONS = {
    "qdsl_w8a8": "qdsl C++ int8 x int8 -> int32 (exact), weights read once per 4 rows",
    "qdsl_w8a8_gemm": "qdsl C++ packed int8 GEMM, 6 x 16 int32 register tile (AVX2 vpmaddwd, "
                      "exact)",
    "qdsl_w8": "qdsl C++ fused dequant GEMV (fp32 FMA on int8 weights)",
    "qdsl_w4": "qdsl C++ fused int4 unpack + dequant GEMV (fp32 FMA); from 16 rows a "
               "panel GEMM on 16-64 rows dequantized at a time",
    "qdsl_w4a8": "qdsl C++ 8-bit quantize + int4 x int8 dot per group (exact int32; "
                 "vpdpbusd / vpmaddubsw on the nibbles as they are packed)",
    "qdsl_w1": "qdsl C++ 1-bit sign-select GEMV (masked adds on the packed bits)",
    "qdsl_w1a8": "qdsl C++ 8-bit quantize + 1-bit sign-select GEMV (exact int32 sums)",
    "qdsl_w1a8_gemm": "qdsl C++ 8-bit quantize + 1-bit GEMM: 8 rows' bits expanded to +-1 "
                      "int8, 32 products per vpsignb + vpmaddubsw (AVX2, exact)",
    "torch_int_mm": "torch._int_mm (oneDNN int8, VNNI)",
    "torch_int8pack_mm": "aten._weight_int8pack_mm (bf16)",
    "torch_bf16_gemm": "int8 -> bf16 weight, bf16 GEMM (AVX512-BF16)",
    "torch_int4pack_mm": "aten._weight_int4pack_mm_for_cpu (bf16)",
    FLOAT: "dequantize + float32 GEMM",
    "torch_gather": "gather int8 rows + scale",
}


def shape_class(m: int) -> str:
    return "decode" if m <= DECODE_MAX_M else "prefill"


def copies_allowed() -> bool:
    """Whether kernels that keep a second layout of a weight may run (``COPIES_ENV``)."""
    return os.environ.get(COPIES_ENV, "0") not in ("0", "")


def eligible(op: str, cls: str, cap: Capability, ext: bool,
             copies: bool | None = None) -> list[str]:
    """The candidates of ``op`` at ``cls`` that are not a reference path on ``cap`` (nor,
    unless ``copies`` (default: ``copies_allowed()``), keep a copy of the weight)."""
    copies = copies_allowed() if copies is None else copies

    def ok(name: str) -> bool:
        if name in COPIES and not copies:
            return False
        if name in ("qdsl_w1", "qdsl_w1a8", "qdsl_w1a8_gemm"):  # their own extension (binary.py)
            return binary.available()
        if name.startswith("qdsl_"):
            return ext
        if name == "torch_int_mm":
            return cap.avx512_vnni
        if name == "torch_int8pack_mm":
            return cls == "decode" and cap.isa >= 2
        if name == "torch_bf16_gemm":
            return cap.avx512_bf16
        if name == "torch_int4pack_mm":
            return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
        return True
    return [c for c in RULES[op][cls] if ok(c)]


def reference_paths(op: str, cls: str, cap: Capability) -> list[str]:
    """The candidates ``eligible`` refuses here for being slow reference paths."""
    return [c for c in RULES[op][cls]
            if not c.startswith("qdsl_") and c not in eligible(op, cls, cap, True, True)]


def machine_key(cap: Capability, threads: int | None = None) -> str:
    """torch version + capability + CPU model + threads (+ the kernel sources, their
    shared header, ``TUNING_VERSION`` and ``QDSL_KERNEL_COPIES``), as a file name:
    ``AVX2-t1-<hash>``."""
    threads = torch.get_num_threads() if threads is None else threads
    sources = (*cext.SOURCES, binary.SOURCE, *cext.HEADERS)
    src = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:8]
    raw = (f"{torch.__version__}|{cap.name}|{cap.model}|{threads}|{src}|{TUNING_VERSION}"
           + ("|copies" if copies_allowed() else ""))
    return f"{cap.name}-t{threads}-{hashlib.sha256(raw.encode()).hexdigest()[:16]}"


def cache_path(cap: Capability) -> Path:
    base = Path(os.environ[CACHE_ENV]) if os.environ.get(CACHE_ENV) else zoo.cache_dir() / "kernels"
    return base / f"{machine_key(cap)}.json"


class Table:
    """The chosen kernel per (operation, class), filled lazily (timed once per machine)."""

    def __init__(self, cap: Capability, ext: bool, autotune: bool, path: Path | None) -> None:
        self.cap, self.ext, self.autotune, self.path = cap, ext, autotune, path
        self.choices: dict[str, str] = {}
        self.used: set[str] = set()       # the keys this process has dispatched
        self.timings: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()
        if path is not None and path.is_file():
            self._read(path)

    def _read(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text())
            choices, timings = dict(data["choices"]), dict(data.get("timings_ms", {}))
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring the kernel table %s (%s); it will be re-measured", path, e)
            return
        for key, name in choices.items():
            op, _, cls = key.partition("/")
            if op in RULES and cls in CLASSES and name in eligible(op, cls, self.cap, self.ext):
                self.choices[key] = name
                self.timings[key] = timings.get(key, {})

    def choose(self, op: str, m: int) -> str:
        cls = shape_class(m)
        key = f"{op}/{cls}"
        self.used.add(key)
        return self._pick(op, cls, key)

    def _pick(self, op: str, cls: str, key: str) -> str:
        hit = self.choices.get(key)
        if hit is not None:
            return hit
        with self._lock:
            if key not in self.choices:
                cands = eligible(op, cls, self.cap, self.ext)
                if self.autotune and len(cands) > 1:
                    self.timings[key] = measure(op, cls, cands)
                    self.choices[key] = min(cands, key=lambda c: self.timings[key][c])
                    self._write()
                else:
                    self.choices[key] = cands[0]
        return self.choices[key]

    def _write(self) -> None:
        if self.path is None:
            return
        try:
            write_json_atomic(self.path, self.to_json())
        except OSError as e:
            log.warning("could not cache the kernel table at %s: %s", self.path, e)

    def to_json(self) -> dict:
        return {"torch": torch.__version__, "capability": self.cap.to_json(),
                "threads": torch.get_num_threads(), "extension": self.ext,
                "weight_copies": copies_allowed(),
                "extension_missing": cext.why_not(),
                "tune_shapes": {c: [list(s) for s in v] for c, v in TUNE_SHAPES.items()},
                "tune_m": TUNE_M,
                "choices": dict(sorted(self.choices.items())),
                "timings_ms": {k: v for k, v in sorted(self.timings.items()) if v}}

    def full(self) -> dict[str, str]:
        """Every (operation, class) chosen (measuring what is not yet)."""
        for op in OPS:                    # a report, not a dispatch: not in ``used``
            for cls in CLASSES:
                self._pick(op, cls, f"{op}/{cls}")
        return dict(self.choices)


_table: list[Table] = []


def table() -> Table:
    """This process's table (C++ kernels built on first call)."""
    if not _table:
        cap = capability()
        ext = cext.load()
        autotune = os.environ.get(AUTOTUNE_ENV, "1") not in ("0", "")
        _table.append(Table(cap, ext, autotune, cache_path(cap)))
    return _table[0]


def reset() -> None:
    """Forget the table (tests: after changing the environment)."""
    _table.clear()


def measure(op: str, cls: str, cands: list[str], repeats: int = 9) -> dict[str, float]:
    """Each candidate's summed median ms over the class's tuning shapes, interleaved."""
    total = dict.fromkeys(cands, 0.0)
    for k, n in TUNE_SHAPES[cls]:
        fns: dict[str, Callable[[], object]] = {c: impls.bench_case(op, c, TUNE_M[cls], k, n)
                                                for c in cands}
        times: dict[str, list[float]] = {c: [] for c in cands}
        with torch.inference_mode():
            for f in fns.values():
                f()
            for _ in range(repeats):
                for c, f in fns.items():
                    t0 = time.perf_counter()
                    f()
                    times[c].append(time.perf_counter() - t0)
        for c, t in times.items():
            total[c] += 1e3 * statistics.median(t)
    return {c: round(t, 4) for c, t in total.items()}
