"""A search's saved progress, so that an interrupted search resumes where it stopped.

``-o found.qrec`` keeps its state beside it until the recipe is written:

* ``found.qrec.partial.json``: the arguments' key, the stage reached and what it
  accumulated (per-batch losses and activation scores while scoring; the scores, the
  float loss and the measured check pairs after);
* ``found.qrec.partial.safetensors``: while scoring, each searched linear's accumulated
  weight Fisher ``N g^2`` (fp32, the tensor the weight scores are priced from).

Both are written atomically (``qdsl.atomic``), the tensors first; each carries the
same ``step`` number, so a pair cut between the two writes is seen and ignored. The
key is what the scores depend on: the model (name and content hash), the candidates,
``--activations``, the calibration windows themselves (a hash of the token ids: data,
samples, length, seed and tokenizer), the batch, the check's size and seed, and the
scorer's code version (a hash of the source of the modules the scores come from, with
qdsl's and torch's versions). A state made with another key is ignored with a
one-line notice and replaced; the budget is not in the key (the allocation is redone
from the scores). The JSON holds floats as Python writes them (``repr``, exact), the
tensors as they were: a resumed search gives the scores of an uninterrupted one
exactly. The observers' pass is re-run on resume (forward only, deterministic).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .. import __version__
from ..atomic.files import atomic_path, write_json_atomic
from ..quant import observers, primitives
from ..runtime import fakequant
from . import candidates, sensitivity, units

log = logging.getLogger(__name__)
FORMAT = "qdsl-search-state"
FORMAT_VERSION = 1
SCORER_MODULES = (sensitivity, units, candidates, observers, primitives, fakequant)


def state_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """(the JSON, the safetensors) kept beside the recipe ``out``."""
    out = Path(out)
    return (out.with_name(out.name + ".partial.json"),
            out.with_name(out.name + ".partial.safetensors"))


def scorer_version() -> str:
    """A hash of the source of every module the scores come from, qdsl's version and
    torch's: a changed scorer does not reuse scores it would not compute."""
    h = hashlib.sha256(f"{__version__}|{torch.__version__}".encode())
    for m in SCORER_MODULES:
        h.update(Path(m.__file__).read_bytes())
    return h.hexdigest()[:20]


def windows_hash(windows: torch.Tensor) -> str:
    w = windows.detach().to(torch.int64).contiguous()
    h = hashlib.sha256(str(tuple(w.shape)).encode())
    h.update(w.view(-1).numpy().tobytes())
    return h.hexdigest()[:20]


@dataclass
class SearchState:
    """What a search accumulated (see the module docstring); ``stage``: "new", "score"
    (``losses`` / ``act_scores`` / ``fisher`` after ``len(losses)`` batches), "scored"
    (``scores``, ``base_loss``, ``windows``; with ``check_base`` / ``checks`` as the
    check goes on)."""

    out: Path
    key: dict
    stage: str = "new"
    step: int = 0
    losses: list[float] = field(default_factory=list)
    act_scores: dict[str, list[float]] = field(default_factory=dict)
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)
    scores: list[list[float]] | None = None
    base_loss: float | None = None
    windows: int | None = None
    check_base: float | None = None
    checks: list[tuple[str, int, float, float]] = field(default_factory=list)

    @property
    def paths(self) -> tuple[Path, Path]:
        return state_paths(self.out)

    # ------------------------------------------------------------------ reading

    @classmethod
    def open(cls, out: str | os.PathLike, key: dict) -> tuple["SearchState", str | None]:
        """The state saved for ``out`` if it was made with ``key``, else a new one;
        and a one-line notice (resumed / ignored, and why), None if there was none."""
        js, st = state_paths(out)
        fresh = cls(Path(out), key)
        if not js.exists():
            return fresh, None
        try:
            data = json.loads(js.read_text(encoding="utf-8"))
            if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
                return fresh, f"ignoring {js}: not a qdsl search state of this version"
            old = data.get("key", {})
            diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
            if diff:
                return fresh, (f"ignoring {js}: made with other arguments "
                               f"({', '.join(diff)}); starting afresh")
            s = cls(Path(out), key, stage=data["stage"], step=int(data["step"]))
            if s.stage == "score":
                s.losses = [float(x) for x in data["losses"]]
                s.act_scores = {k: [float(x) for x in v] for k, v in data["act_scores"].items()}
                s.fisher, step = _read_tensors(st)
                if step != s.step:
                    return fresh, (f"ignoring {js}: {st.name} is from another save "
                                   "(cut between its two writes); starting afresh")
            elif s.stage == "scored":
                s.scores = [[float(x) for x in row] for row in data["scores"]]
                s.base_loss, s.windows = float(data["base_loss"]), int(data["windows"])
                s.check_base = (None if data["check_base"] is None
                                else float(data["check_base"]))
                s.checks = [(str(k), int(i), float(a), float(b)) for k, i, a, b in data["checks"]]
            else:
                raise ValueError(f"unknown stage {s.stage!r}")
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
            return fresh, f"ignoring {js}: unreadable ({e}); starting afresh"
        return s, f"resuming from {js}: {s.describe()}"

    def describe(self) -> str:
        if self.stage == "score":
            return f"{len(self.losses)} scored batch(es) reused"
        return (f"every score reused ({self.windows} windows), {len(self.checks)} check "
                "pair(s) reused")

    # ------------------------------------------------------------------ writing

    def _write(self, body: dict, tensors: dict[str, torch.Tensor] | None) -> None:
        self.step += 1
        js, st = self.paths
        if tensors is not None:
            with atomic_path(st, suffix=".tmp.safetensors") as tmp:
                save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp),
                          metadata={"format": FORMAT, "step": str(self.step)})
        elif st.exists():
            st.unlink()
        write_json_atomic(js, {"format": FORMAT, "format_version": FORMAT_VERSION,
                               "key": self.key, "stage": self.stage, "step": self.step, **body})

    def save_score(self, losses: list[float], act_scores: dict[str, list[float]],
                   fisher: dict[str, torch.Tensor]) -> None:
        """After a scored batch: what the batches so far accumulated."""
        self.stage, self.losses, self.act_scores = "score", list(losses), act_scores
        self._write({"losses": self.losses, "act_scores": act_scores}, fisher)

    def save_scored(self, scores, base_loss: float, windows: int, check_base: float | None,
                    checks: list) -> None:
        """After the scores, then after each check pair."""
        self.stage, self.scores, self.base_loss, self.windows = "scored", scores, base_loss, windows
        self.check_base, self.checks = check_base, list(checks)
        self._write({"scores": scores, "base_loss": base_loss, "windows": windows,
                     "check_base": check_base, "checks": [list(c) for c in self.checks]}, None)

    def remove(self) -> None:
        for p in self.paths:
            if p.exists():
                p.unlink()


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], int | None]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path.name} is not a search state")
    return load_file(str(path)), int(meta["step"])
