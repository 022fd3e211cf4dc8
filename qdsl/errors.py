"""The project's error types. User mistakes raise these; the CLI prints them
without a traceback. ``assert`` is kept for internal invariants only."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Diagnostic:
    """One located message: ``FILE:LINE:COL: error: MESSAGE`` + the line + a caret + a hint.

    ``line`` and ``col`` are 1-based; ``source_line`` is the offending line's text
    (may be empty when unknown).
    """

    file: str
    line: int
    col: int
    message: str
    severity: str = "error"  # or "warning"
    hint: str | None = None
    source_line: str = ""

    def format(self) -> str:
        # user text (a path, a quoted word) reaches messages too: nothing unprintable goes out
        out = [_printable(f"{self.file}:{self.line}:{self.col}: {self.severity}: {self.message}")]
        if self.source_line:
            text = self.source_line.rstrip("\n")
            if len(text) > 200:  # hostile input: show a window around the column
                start = max(0, self.col - 100)
                text, caret_col = text[start:start + 200], self.col - start
            else:
                caret_col = self.col
            text = "".join(c if c.isprintable() or c == "\t" else "?" for c in text)
            out.append(f"    {text}")
            pad = "".join("\t" if c == "\t" else " " for c in text[:max(caret_col - 1, 0)])
            out.append(f"    {pad}^")
        if self.hint:
            out.append(_printable(f"  hint: {self.hint}"))
        return "\n".join(out)


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)


class QdslError(Exception):
    """Base class of every error qdsl reports to a user."""

    def format(self) -> str:
        return f"error: {self}"


class RecipeError(QdslError):
    """One or more errors in recipe text, each with file:line:col."""

    def __init__(self, diagnostics: list[Diagnostic]):
        assert diagnostics, "RecipeError needs at least one diagnostic"
        self.diagnostics = list(diagnostics)
        super().__init__(diagnostics[0].message if len(diagnostics) == 1
                         else f"{len(diagnostics)} errors, first: {diagnostics[0].message}")

    def format(self) -> str:
        return "\n".join(d.format() for d in self.diagnostics)


class GraphError(QdslError):
    """A problem with a model graph: names the node (or module) and why."""

    def __init__(self, message: str, node: str | None = None, hint: str | None = None):
        self.node, self.hint = node, hint
        super().__init__(message)

    def format(self) -> str:
        where = f" at node {self.node}" if self.node else ""
        text = f"error{where}: {self}"
        return text + (f"\n  hint: {self.hint}" if self.hint else "")


class CaptureError(GraphError):
    """A model could not be captured as a graph."""


class PlanError(QdslError):
    """A recipe does not fit a model graph (rule matched nothing, w8 on a softmax ...).

    Carries the recipe diagnostics so the CLI can point at file:line:col.
    """

    def __init__(self, diagnostics: list[Diagnostic]):
        self.diagnostics = list(diagnostics)
        super().__init__(diagnostics[0].message)

    def format(self) -> str:
        return "\n".join(d.format() for d in self.diagnostics)


class ArtifactError(QdslError):
    """A compiled artifact is missing, corrupt, or does not belong to the given model."""


class ExportError(QdslError):
    """An artifact cannot be written in an outside format (GGUF, compressed-tensors):
    names the node or tensor and why, and the nearest spec that format carries."""


class ModelError(QdslError):
    """A model name or directory cannot be resolved or loaded."""


class OptionError(QdslError):
    """A setting (a command-line option) that does not fit the model it is used with,
    e.g. a context longer than the model's position table; names the option and the limit."""


class SandboxError(QdslError):
    """Untrusted code (HumanEval's generated programs) cannot be run isolated here;
    says why and what to do (install bubblewrap, or pass --unsafe-exec)."""


class OutputError(QdslError):
    """An output directory cannot be written: it holds something qdsl did not write,
    another qdsl process is writing it, or the system refused (``qdsl.atomic``)."""
