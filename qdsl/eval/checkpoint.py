"""Completions saved as they finish, so that a long evaluation interrupted (a session's
end, Ctrl-C, a killed worker) resumes where it stopped instead of starting over.

A sweep job at issue 16's sample sizes (SmolLM2: 1,000-1,600 completions) runs close to
an hour; without this, every interruption threw that hour away. ``score_completion``
takes a ``CompletionCheckpoint``: before it starts, the predictions already saved are
read back, and each batch whose samples all have one is skipped; as batches finish the
file is rewritten whole (temporary file, then rename: an interrupted write leaves the
previous one), at most every ``every`` seconds and once at the end.

Reused only when they would be computed again unchanged: the file carries a header
(whatever the caller puts there: the job's key, the rows per batch, the compiled
model's parameter hash, the CPU capability, torch version and ``qdsl.NUMERICS``, whose
float summation order a greedy choice can depend on) and is ignored, with a warning,
when the header differs. Batches are drawn in a fixed order from the samples (``complete._batches``),
so a resumed batch holds the same samples as it would have; a batch is skipped only
whole. Wall and CPU seconds of the earlier runs are carried over, so the result's
``complete_seconds`` still counts the whole evaluation.

Perplexity after the completions is saved in the same file (``ppl``: per window its
summed NLL, tokens and bytes, and the seconds spent): on Qwen2.5-Coder a job's 256
windows take ~35 minutes of a core, more than its completions, and a session's end
used to throw that away. ``score_perplexity`` skips each chunk of windows (one
forward) whose windows were all saved, under the same header."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import write_json_atomic

log = logging.getLogger(__name__)

FORMAT = "qdsl-completion-checkpoint"


@dataclass
class CompletionCheckpoint:
    path: Path
    header: dict                  # must equal the saved one for its predictions to count
    every: float = 60.0           # seconds between writes (and one at the end)
    extra: dict = field(default_factory=dict)   # the caller's, saved and read back as is
    ppl: dict = field(default_factory=dict)     # window index (str) -> [nll, tokens, bytes]
    ppl_seconds: float = 0.0                    # perplexity's wall seconds so far
    _last: float = float("-inf")   # the first batch is always written
    _saved: tuple = ({}, 0.0, 0.0)  # the completions last saved or loaded
    _loaded: bool = False

    def load(self) -> tuple[dict[str, str], float, float]:
        """(sample id -> prediction, wall seconds, CPU seconds) saved by an earlier run
        with this header; nothing when there is no file, or a header, format or content
        that does not fit (a warning names the file and why). Sets ``extra`` and the
        perplexity windows saved (``ppl``)."""
        self._loaded = True
        path = Path(self.path)
        if not path.exists():
            return {}, 0.0, 0.0
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError("not a completion checkpoint")
            if data.get("header") != self.header:
                diff = sorted(k for k in set(data.get("header") or {}) | set(self.header)
                              if (data.get("header") or {}).get(k) != self.header.get(k))
                log.warning("completion checkpoint %s is of another run (%s differ): "
                            "starting over", path, ", ".join(diff) or "header")
                return {}, 0.0, 0.0
            preds = data["preds"]
            if not isinstance(preds, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in preds.items()):
                raise ValueError("preds is not a map of sample ids to text")
            self.extra = data.get("extra") or {}
            self.ppl = _ppl(data.get("ppl"))
            self.ppl_seconds = float(data["ppl"].get("seconds", 0.0)) if self.ppl else 0.0
            self._saved = (preds, float(data.get("seconds", 0.0)),
                           float(data.get("cpu_seconds", 0.0)))
            return self._saved
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("completion checkpoint %s is unusable (%s): starting over", path, e)
            return {}, 0.0, 0.0

    def saved_extra(self) -> dict | None:
        """The ``extra`` of the file as saved, whatever its header (None: no usable
        file), for a caller deciding how to rebuild the model whose header it needs."""
        try:
            data = json.loads(Path(self.path).read_text(encoding="utf-8"))
            return data["extra"] if isinstance(data.get("extra"), dict) else None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def save(self, preds: dict[str, str], seconds: float, cpu_seconds: float,
             force: bool = False) -> bool:
        """Write the predictions so far (at most every ``every`` seconds unless
        ``force``); True if written."""
        if not self._due(force):
            return False
        self._saved = (dict(preds), seconds, cpu_seconds)
        self._write()
        return True

    def saved_windows(self) -> dict[int, list]:
        """Perplexity's windows saved by an earlier run with this header (index ->
        [summed NLL, tokens, bytes]); reads the file if ``load`` has not."""
        if not self._loaded:
            self.load()
        return {int(k): v for k, v in self.ppl.items()}

    def save_ppl(self, windows: dict[int, list], seconds: float, force: bool = False) -> bool:
        """Write perplexity's windows so far (index -> [summed NLL, tokens, bytes]) beside
        the completions last saved, at most every ``every`` seconds unless ``force``."""
        if not self._due(force):
            return False
        self.ppl = {str(i): list(v) for i, v in windows.items()}
        self.ppl_seconds = seconds
        self._write()
        return True

    def _due(self, force: bool) -> bool:
        """Whether a write is due (``every`` seconds since the last, or ``force``)."""
        return force or time.monotonic() - self._last >= self.every

    def _write(self) -> None:
        preds, seconds, cpu_seconds = self._saved
        data = {"format": FORMAT, "header": self.header, "extra": self.extra,
                "seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2),
                "n_done": len(preds), "preds": preds}
        if self.ppl:
            data["ppl"] = {"seconds": round(self.ppl_seconds, 2), "windows": self.ppl}
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, data)
        self._last = time.monotonic()

    def remove(self) -> None:
        """The evaluation is finished and kept elsewhere: the checkpoint is not needed."""
        Path(self.path).unlink(missing_ok=True)


def _ppl(saved) -> dict:
    """A checkpoint's saved perplexity windows, checked: index (str) -> [nll, tokens,
    bytes]; raises ValueError on anything else (the caller starts over)."""
    if saved is None:
        return {}
    windows = saved.get("windows") if isinstance(saved, dict) else None
    if not isinstance(windows, dict) or not all(
            isinstance(k, str) and k.isdigit() and isinstance(v, list) and len(v) == 3
            and all(isinstance(x, (int, float)) for x in v) for k, v in windows.items()):
        raise ValueError("ppl is not a map of window indices to [nll, tokens, bytes]")
    return {k: list(v) for k, v in windows.items()}
