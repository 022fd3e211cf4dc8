"""What this CPU can run, as the kernel table sees it.

The effective instruction set is the lower of what the CPU has (``/proc/cpuinfo``
flags) and what torch dispatches to (``torch.backends.cpu.get_cpu_capability()``,
which honours ``ATEN_CPU_CAPABILITY``); oneDNN's ``ONEDNN_MAX_CPU_ISA`` caps the
oneDNN-backed kernels (``_int_mm``, bf16 GEMMs) too. So
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` makes an AVX-512 VNNI machine
choose exactly what an AVX2-only one would.

Some torch kernels test the hardware themselves and ignore those variables: on this
torch, ``torch._int_mm`` runs oneDNN where the CPU has AVX512-VNNI and a scalar
reference loop elsewhere, and the bf16 GEMM is emulated without AVX512-BF16. The
table (``tuning.py``) therefore never offers them where ``Capability`` lacks the
feature, whatever the hardware would do.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import asdict, dataclass

import torch

# cext.py's `isa` argument
ISA_GENERIC, ISA_AVX2, ISA_AVX512, ISA_VNNI = 0, 1, 2, 3
ISA_NAMES = {ISA_GENERIC: "generic", ISA_AVX2: "avx2", ISA_AVX512: "avx512",
             ISA_VNNI: "avx512_vnni"}
_ONEDNN_ORDER = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                 "AVX512_CORE_VNNI", "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16",
                 "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2")


@dataclass(frozen=True)
class Capability:
    """The CPU as kernels see it (features already capped by the environment)."""

    torch_capability: str      # torch.backends.cpu.get_cpu_capability()
    isa: int                   # ISA_* level for qdsl's own kernels
    avx512_vnni: bool          # int8 dot products (oneDNN _int_mm / qlinear are fast, exact)
    avx512_bf16: bool          # native bf16 GEMMs
    amx: bool
    model: str                 # the CPU's model name
    forced: bool               # an environment variable capped the hardware

    @property
    def name(self) -> str:
        """Short label: AVX2, AVX512, AVX512_VNNI, AVX512_VNNI_BF16 (+ _AMX), or the torch name."""
        if self.isa == ISA_GENERIC:
            return self.torch_capability or "DEFAULT"
        label = "AVX2" if self.isa == ISA_AVX2 else "AVX512"
        if self.avx512_vnni:
            label += "_VNNI"
        if self.avx512_bf16:
            label += "_BF16"
        return label + ("_AMX" if self.amx else "")

    def describe(self) -> str:
        forced = " (forced by the environment)" if self.forced else ""
        return f"{self.name}{forced}, torch capability {self.torch_capability}, {self.model}"

    def to_json(self) -> dict:
        return {**asdict(self), "name": self.name}


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _onednn_allows(level: str) -> bool:
    """Whether ONEDNN_MAX_CPU_ISA (unset: everything) admits ``level``."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    if not cap or cap == "ALL" or cap not in _ONEDNN_ORDER:
        return True
    return _ONEDNN_ORDER.index(cap) >= _ONEDNN_ORDER.index(level)


@functools.cache
def capability() -> Capability:
    """This process's capability (computed once: the variables are read at start-up)."""
    return detect(torch.backends.cpu.get_cpu_capability(), cpu_flags(), cpu_model())


def detect(torch_cap: str, flags: frozenset[str], model: str = "") -> Capability:
    """The capability from torch's dispatch level and the CPU flags (pure: tests feed both)."""
    tc = torch_cap.upper()
    torch_512 = tc.startswith("AVX512")
    has_avx2 = {"avx2", "fma"} <= flags and (tc == "AVX2" or torch_512)
    has_512 = torch_512 and {"avx512f", "avx512bw", "avx512vl"} <= flags
    vnni = has_512 and "avx512_vnni" in flags and _onednn_allows("AVX512_CORE_VNNI")
    bf16 = has_512 and "avx512_bf16" in flags and _onednn_allows("AVX512_CORE_BF16")
    amx = bf16 and "amx_int8" in flags and _onednn_allows("AVX10_1_512_AMX")
    isa = ISA_VNNI if vnni else ISA_AVX512 if has_512 else ISA_AVX2 if has_avx2 else ISA_GENERIC
    hw_vnni = "avx512_vnni" in flags
    forced = (hw_vnni and not vnni) or ("avx512f" in flags and not has_512)
    return Capability(torch_cap, isa, vnni, bf16, amx, model, forced)
