"""Pass: run calibration data through a graph with observers in it.

requires: observers inserted (``insert_observers``); ``run`` feeds one window.
ensures:  every observer has seen every window; the graph is unchanged.
Shows a progress bar; Ctrl-C propagates. With a ``CalibrationCheckpoint`` the
observers' and recorders' state is saved every two minutes (safetensors, written to a
temporary file and renamed) and a later run of the same calibration resumes after
the batches it holds; the file is removed once every batch has run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic.files import atomic_path
from ..progress import Progress
from ..progress import bar as progress_bar

log = logging.getLogger(__name__)

FORMAT = "qdsl-calibration-checkpoint"


@dataclass
class CalibrationCheckpoint:
    """Where a calibration saves its modules' state and what it must match to resume.

    ``modules``: name -> module with ``calib_state()`` / ``load_calib_state(d)`` (the
    observers of ``qdsl.quant.observers``, ``qdsl.quant.hessian.InputStats``): buffers
    plus what is not a buffer (an observer's sampling generator, a recorder's count),
    so a resumed calibration ends where an uninterrupted one does (sample-based
    observers up to equal random keys). ``header``: the caller's identity of the run
    (the sweep: its job key); the file also records a hash of the windows, the batch
    size and every module's name and configuration, and one that differs is ignored
    with a warning."""

    path: Path
    modules: dict[str, nn.Module]
    header: str = ""
    every: float = 120.0    # seconds between writes
    _last: float = 0.0

    def fingerprint(self, batches: list[torch.Tensor]) -> str:
        h = hashlib.sha256(self.header.encode())
        for b in batches:
            h.update(str(tuple(b.shape)).encode())
            h.update(b.contiguous().numpy().tobytes())
        for name in sorted(self.modules):
            m = self.modules[name]
            cfg = m.to_json() if hasattr(m, "to_json") else type(m).__name__
            h.update(json.dumps([name, cfg], sort_keys=True, default=str).encode())
        return h.hexdigest()

    def load(self, fingerprint: str) -> int:
        """Batches an earlier run with this fingerprint finished (their state loaded into
        the modules); 0 when there is no usable file. The first write is ``every``
        seconds from now."""
        self._last = time.monotonic()
        if not self.path.exists():
            return 0
        try:
            tensors = load_file(self.path)
            meta = json.loads(bytes(tensors.pop("__meta__").tolist()).decode())
            if meta.get("format") != FORMAT or meta.get("fingerprint") != fingerprint:
                log.warning("calibration checkpoint %s is of another calibration: starting "
                            "over", self.path)
                return 0
            for name, m in self.modules.items():
                prefix = f"{name}/"
                m.load_calib_state({k[len(prefix):]: v for k, v in tensors.items()
                                    if k.startswith(prefix)})
            return int(meta["done"])
        except (OSError, SafetensorError, ValueError, KeyError, RuntimeError) as e:
            log.warning("calibration checkpoint %s is unreadable (%s): starting over",
                        self.path, e)
            return 0

    def save(self, fingerprint: str, done: int) -> None:
        """Write the modules' state after ``done`` batches, if ``every`` seconds passed."""
        if time.monotonic() - self._last < self.every:
            return
        tensors = {f"{name}/{k}": v.detach().contiguous().clone()
                   for name, m in self.modules.items() for k, v in m.calib_state().items()}
        meta = json.dumps({"format": FORMAT, "fingerprint": fingerprint, "done": done})
        tensors["__meta__"] = torch.tensor(list(meta.encode()), dtype=torch.uint8)
        with atomic_path(self.path, suffix=".tmp.safetensors") as tmp:
            save_file(tensors, str(tmp))
        self._last = time.monotonic()


@torch.inference_mode()
def calibrate(run: Callable[[torch.Tensor], object], windows: torch.Tensor, *,
              batch_size: int = 1, progress: Progress = True,
              checkpoint: CalibrationCheckpoint | None = None) -> None:
    """``windows``: [N, T] token ids (split into batches of ``batch_size``) or a sequence
    of [B, T] batches; ``run(ids [B, T])`` runs the model on one batch. ``checkpoint``:
    resume from / save to it (above)."""
    batches = list(windows.split(batch_size) if isinstance(windows, torch.Tensor) else windows)
    start, key = 0, None
    if checkpoint is not None:
        key = checkpoint.fingerprint(batches)
        start = checkpoint.load(key)
        if start:
            log.info("calibration resumed from %s after %d of %d batches", checkpoint.path,
                     start, len(batches))
    for i, batch in enumerate(progress_bar(batches[start:], desc="calibrating", unit="batch",
                                           progress=progress, leave=False,
                                           total=len(batches), initial=start), start + 1):
        run(batch)
        if checkpoint is not None and i < len(batches):
            checkpoint.save(key, i)
    if checkpoint is not None:
        checkpoint.path.unlink(missing_ok=True)
