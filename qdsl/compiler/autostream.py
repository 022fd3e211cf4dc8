"""Whether ``qdsl compile`` streams: ``--stream``, ``--no-stream``, or automatic.

Automatic (neither flag): the in-memory compile's peak is estimated from the
checkpoint's float32 weights as ``IN_MEMORY_FACTOR x weights + IN_MEMORY_OVERHEAD``
(3.5x + 1 GiB: measured on SmolLM2-135M and Qwen2.5-Coder-0.5B, docs/scale.md) and
compared with the memory available to this process (``MemAvailable`` of
``/proc/meminfo``, and the room left under its memory cgroup's limit, v1 or v2,
the smaller). If the estimate does not fit and the recipe streams, the compile
streams (one line says so); if it does not fit and the recipe cannot stream, it
warns that the compile may not fit and runs in memory. Unknown sizes (no
safetensors header, no ``/proc``) leave the in-memory default.

``decide`` is a pure function of those sizes and the recipe's refusal (``refusal``:
why this recipe / model cannot stream, or None); the probes are separate.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..config.recipe import Recipe, Settings

IN_MEMORY_FACTOR = 3.5
IN_MEMORY_OVERHEAD = 1 << 30
GIB = float(1 << 30)
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


@dataclass(frozen=True)
class Decision:
    stream: bool
    message: str | None = None   # one line for the user (stderr); None: say nothing
    warning: bool = False        # the message warns (may not fit)


def in_memory_estimate(float_bytes: int) -> int:
    """Estimated peak resident bytes of the in-memory compile of ``float_bytes`` of
    float32 weights."""
    return int(IN_MEMORY_FACTOR * float_bytes) + IN_MEMORY_OVERHEAD


def decide(flag: bool | None, float_bytes: int | None, available: int | None,
           refusal: str | None) -> Decision:
    """``flag``: True (``--stream``), False (``--no-stream``), None (automatic)."""
    if flag is not None:
        return Decision(stream=flag)
    if float_bytes is None or available is None:
        return Decision(stream=False)
    need = in_memory_estimate(float_bytes)
    if need <= available:
        return Decision(stream=False)
    sizes = (f"compiling in memory needs about {need / GIB:.1f} GiB ({IN_MEMORY_FACTOR:g} x "
             f"{float_bytes / GIB:.2f} GiB of float32 weights + {IN_MEMORY_OVERHEAD / GIB:g} "
             f"GiB), {available / GIB:.1f} GiB available")
    if refusal is None:
        return Decision(True, f"note: {sizes}: streaming block by block (--stream; "
                              "--no-stream compiles in memory)")
    return Decision(False, f"warning: {sizes}, and this compile cannot stream ({refusal}): "
                           "compiling in memory, it may not fit", warning=True)


def recipe_refusal(recipe: Recipe, settings: Settings, lower: str) -> str | None:
    """Why ``recipe`` (with the merged ``settings`` and ``lower``) cannot stream, judged
    from its text before any capture; None if it can (GPTQ / AWQ rounding streams, one
    stage at a time)."""
    if lower != "fake":
        return f"--lower {lower}"
    if settings.student_blocks:
        return "student.blocks"
    if recipe.transforms:
        return f"`{recipe.transforms[0].kind}`"
    return None


def stream_refusal(recipe: Recipe, settings: Settings, lower: str) -> str | None:
    """``recipe_refusal``, or the missing ``accelerate`` the skeleton is built with."""
    why = recipe_refusal(recipe, settings, lower)
    if why is None and importlib.util.find_spec("accelerate") is None:
        return "accelerate is not installed"
    return why


def checkpoint_float_bytes(path: str | Path) -> int | None:
    """Bytes of the checkpoint's floating-point tensors once cast to float32 (what the
    compile holds), from the safetensors headers alone; None if there are none."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    try:
        for f in files:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            for key, info in header.items():
                if key != "__metadata__" and info.get("dtype") in _FLOAT_DTYPES:
                    total += 4 * math.prod(info["shape"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return total


def memory_available() -> int | None:
    """Bytes this process may still use: ``MemAvailable``, capped by the room under
    its memory cgroup's limit (limit - usage); None where neither can be read."""
    vals = [v for v in (_mem_available(), _cgroup_room()) if v is not None]
    return min(vals) if vals else None


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> int | None:
    """limit - usage of this process's memory cgroup (v2, then v1); None if unlimited."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "":   # v2
            d = Path("/sys/fs/cgroup") / rel.lstrip("/")
            room = _room(d / "memory.max", d / "memory.current")
        elif "memory" in controllers.split(","):   # v1
            d = Path("/sys/fs/cgroup/memory") / rel.lstrip("/")
            room = _room(d / "memory.limit_in_bytes", d / "memory.usage_in_bytes")
        else:
            continue
        if room is not None:
            return room
    return None


def _room(limit_file: Path, usage_file: Path) -> int | None:
    try:
        text = limit_file.read_text().strip()
        if text == "max":
            return None
        limit = int(text)
        if limit >= 1 << 60:   # v1's "unlimited"
            return None
        return max(0, limit - int(usage_file.read_text().strip()))
    except (OSError, ValueError):
        return None
