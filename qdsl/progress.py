"""Progress for long work, one helper for every loop that shows it.

``progress`` is what callers pass down: ``False`` shows nothing, ``True`` a live tqdm
bar, and a string a *labelled line mode* for work that shares a terminal or a log with
other processes (a sweep's pool workers, ``qdsl sweep -j N``): a plain line on stderr
when a phase starts, at most one a minute while it runs and one when it ends, each
beginning with the label, e.g.::

    [storti/t2_w8a32] t2_w8a32: complete: 412/1572 [05:10<14:34, 1.33sample/s, batch=8]

Live bars from several processes overwrite each other, and no bar at all left a
ten-hour ``-j 2`` sweep silent for an hour at a time; a sweep also uses line mode when
stderr is not a terminal (``nohup ... > log``), where live bars' redraws pile up.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from tqdm.auto import tqdm

Progress = bool | str   # False: nothing; True: a live bar; a label: lines (above)

LINE_INTERVAL = 60.0    # seconds between two lines of one phase in line mode
_LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class _Lines:
    """A file for tqdm that turns its carriage-return redraws into labelled lines."""

    def __init__(self, label: str, stream=None):
        self.label, self.stream, self.last = label, stream, None

    def write(self, s: str) -> None:
        s = s.strip("\r\n").strip()
        if s and s != self.last:   # tqdm redraws the final state when it closes
            self.last = s
            out = self.stream or sys.stderr   # looked up late: pytest swaps sys.stderr
            out.write(f"{self.label} {s}\n")
            out.flush()

    def flush(self) -> None:
        pass


def live() -> bool:
    """Whether stderr is a terminal, where a live bar redraws in place (in a log file
    its redraws pile up as one endless line: use labelled lines there)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):   # replaced or closed
        return False


def on_stderr(label: str) -> Progress:
    """What to show on this process's stderr: a live bar on a terminal, else lines
    beginning with ``label``."""
    return True if live() else label


def bar(iterable: Iterable | None = None, *, progress: Progress, desc: str,
        unit: str = "it", total: int | None = None, leave: bool = True,
        interval: float = LINE_INTERVAL, **kw) -> tqdm:
    """A tqdm over ``iterable`` (or a manual one with ``total``) as ``progress`` says.
    ``leave``: whether a live bar stays on screen when done (line mode always ends with
    a line). ``interval``: seconds between lines in line mode."""
    if isinstance(progress, str):
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=True,
                    file=_Lines(progress), mininterval=interval, maxinterval=interval,
                    bar_format=_LINE_FORMAT, dynamic_ncols=False, ascii=True, **kw)
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave,
                disable=not progress, **kw)
