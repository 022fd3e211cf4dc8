"""Memory trace of a compile (``qdsl compile --stream --trace-memory FILE``): where the
peak resident set goes, step by step.

``MemTrace.mark(step)`` appends one JSON line to FILE (flushed at once, so a run
that is interrupted or killed for memory keeps its trace up to the last step):

    {"step": "block 3 run", "rss_mib": 861.2, "peak_mib": 903.5, "maxrss_mib": 903.5,
     "process_peak_mib": 1210.0, "t_s": 41.2}

``rss_mib``: resident now (``/proc/self/statm``); ``peak_mib``: the highest resident
set *since the previous mark* (``VmHWM`` of ``/proc/self/status``, reset after each
mark by writing 5 to ``/proc/self/clear_refs``, Linux 4.0+), so a peak is attributed
to the step that made it; ``maxrss_mib``: ``ru_maxrss`` (see below);
``process_peak_mib``: the process's peak so far; ``t_s``: seconds since the trace began. Where
the peak cannot be reset (not Linux, ``clear_refs`` not writable) ``peak_mib`` is
``null``. ``summary()`` names the step with the highest peak.

Resetting the high-water mark also resets what ``ru_maxrss`` and an outer
``/usr/bin/time -v`` report (the kernel keeps one mark): with a trace they give the
peak since the last step, and the trace's ``process_peak_mib`` (the highest
``peak_mib`` so far, in every line and in the summary) is the process's peak.
A disabled trace (``MemTrace(None)``) costs one attribute test per mark.

``trim_heap()``: ``malloc_trim(0)`` (glibc), which hands the free pages inside the
C heap back to the kernel; the streamed compile calls it after freeing each stage.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import sys
import time
from pathlib import Path

MIB = 1 << 20
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int | None:
    """Resident set size now, bytes (None where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def max_rss_bytes() -> int:
    """``ru_maxrss``: the process's peak resident set so far, bytes."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


_LIBC = None


def trim_heap() -> bool:
    """``malloc_trim(0)``: return the C heap's free pages to the kernel (glibc; False
    where there is no such call). Blocks freed between live allocations stay mapped
    otherwise, and the resident set grows stage by stage (docs/scale.md)."""
    global _LIBC
    if _LIBC is None:   # the running program's own libc: ctypes.util.find_library
        try:            # would fork ldconfig from a process of a GiB or more
            _LIBC = ctypes.CDLL(None)
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if not _LIBC:
        return False
    _LIBC.malloc_trim(0)
    return True


class MemTrace:
    """JSON lines of resident memory at named steps; see the module docstring."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        self.records: list[dict] = []
        self._file = None
        self.peak = 0.0
        if self.path is not None:
            self._file = open(self.path, "w", encoding="utf-8")
            self._t0 = time.monotonic()
            self.peak = round(max_rss_bytes() / MIB, 1)   # before the first reset
            self._resettable = _reset_hwm()

    @property
    def enabled(self) -> bool:
        return self._file is not None

    def mark(self, step: str, **extra) -> None:
        if self._file is None:
            return
        rss, hwm = rss_bytes(), _hwm_bytes() if self._resettable else None
        peak = None if hwm is None else round(max(hwm, rss or 0) / MIB, 1)
        maxrss = round(max_rss_bytes() / MIB, 1)
        self.peak = max(self.peak, peak or 0.0, maxrss)
        rec = {"step": step,
               "rss_mib": None if rss is None else round(rss / MIB, 1),
               "peak_mib": peak, "maxrss_mib": maxrss, "process_peak_mib": self.peak,
               "t_s": round(time.monotonic() - self._t0, 2), **extra}
        self.records.append(rec)
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        if self._resettable:
            _reset_hwm()

    def summary(self) -> str:
        """One line: the process peak and the step whose interval reached the highest."""
        return _summary(self.records, self.path)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def summary(path: str | os.PathLike) -> str:
    """``MemTrace.summary`` of a trace file written by another call (or process)."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line]
    return _summary(records, path)


def _summary(records: list[dict], path) -> str:
    if not records:
        return f"memory trace: no steps -> {path}"
    top = max(records, key=lambda r: r["peak_mib"] or r["rss_mib"] or 0)
    return (f"memory trace: process peak {records[-1]['process_peak_mib']:.0f} MiB; highest "
            f"step {top['step']!r} at {top['peak_mib'] or top['rss_mib']:.0f} MiB -> {path}")
