"""Calibration data: fixed-length token windows, deterministic with a seed.

Sources (``--calib`` / ``set calib.data``):
  * a directory of source files (``*.py`` by default): files in sorted order,
    tokenised with the model's tokenizer, joined with the EOS token, cut into
    windows of ``seq_len`` tokens; ``samples`` windows drawn with ``seed``;
  * a ``datasets`` dataset saved on disk (``save_to_disk``), text column
    ``text`` or ``content``;
  * ``stdlib``: the Python standard library's non-test sources (the training
    split of the shipped reference model; the held-out test split is for eval).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..errors import QdslError
from .stdlib import stdlib_files

log = logging.getLogger(__name__)

DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, DEFAULT_SEED = 128, 256, 0
_MAX_FILE_BYTES = 1_000_000  # skip generated giants


class CalibrationError(QdslError):
    """Calibration data missing, empty or unreadable."""


@dataclass(frozen=True)
class CalibSpec:
    source: str
    samples: int = DEFAULT_SAMPLES
    seq_len: int = DEFAULT_SEQ_LEN
    seed: int = DEFAULT_SEED


def _texts(source: str, pattern: str = "*.py") -> Iterator[str]:
    if source == "stdlib":  # the reference model's train split; eval uses the test split
        files = stdlib_files("train")
    else:
        path = Path(source)
        if not path.exists():
            raise CalibrationError(f"calibration data {source!r} does not exist "
                                   "(give a directory of source files, a dataset saved with "
                                   "datasets' save_to_disk, or 'stdlib')")
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            yield from _dataset_texts(path)
            return
        files = sorted(path.rglob(pattern)) if path.is_dir() else [path]
    for f in files:
        if f.is_file() and f.stat().st_size <= _MAX_FILE_BYTES:
            yield f.read_text(encoding="utf-8", errors="replace")


def _dataset_texts(path: Path) -> Iterator[str]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    column = next((c for c in ("text", "content", "code") if c in ds.column_names), None)
    if column is None:
        raise CalibrationError(f"dataset {path} has no text column (text/content/code): "
                               f"{ds.column_names}")
    for row in ds:
        yield row[column]


def calibration_windows(spec: CalibSpec, tokenizer) -> torch.Tensor:
    """Token windows [samples, seq_len] (int64) from ``spec.source``.

    Stops tokenising once it has 4x the windows it needs (enough to sample from
    without reading a whole corpus), so large directories stay fast.
    """
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    need = spec.samples * spec.seq_len * 4
    ids: list[int] = []
    for text in _texts(spec.source):
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(eos)
        if len(ids) >= need:
            break
    n = len(ids) // spec.seq_len
    if n == 0:
        raise CalibrationError(f"calibration data {spec.source!r} gave {len(ids)} tokens, "
                               f"fewer than one window of {spec.seq_len}")
    windows = torch.tensor(ids[: n * spec.seq_len], dtype=torch.long).view(n, spec.seq_len)
    if n < spec.samples:
        log.warning("calibration data %r has %d windows of %d tokens; using all of them "
                    "instead of %d", spec.source, n, spec.seq_len, spec.samples)
        return windows
    pick = sorted(random.Random(spec.seed).sample(range(n), spec.samples))
    return windows[pick]
