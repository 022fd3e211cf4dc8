"""Pass: run calibration data through a graph with observers in it.

requires: observers inserted (``insert_observers``); ``run`` feeds one window.
ensures:  every observer has seen every window; the graph is unchanged.
Shows a progress bar; Ctrl-C propagates (nothing is written by this pass).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..progress import Progress
from ..progress import bar as progress_bar


@torch.inference_mode()
def calibrate(run: Callable[[torch.Tensor], object], windows: torch.Tensor, *,
              batch_size: int = 1, progress: Progress = True) -> None:
    """``windows``: [N, T] token ids (split into batches of ``batch_size``) or a sequence
    of [B, T] batches; ``run(ids [B, T])`` runs the model on one batch."""
    batches = windows.split(batch_size) if isinstance(windows, torch.Tensor) else windows
    for batch in progress_bar(batches, desc="calibrating", unit="batch", progress=progress,
                              leave=False):
        run(batch)
