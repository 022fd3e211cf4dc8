"""Capture a model as a torch.fx graph with ``torch.export`` (non-strict).

Two modes:

* ``"plain"``: the whole-sequence graph, ``input_ids [B, T] -> logits [B, T, V]``
  (``last_hidden_state [B, T, D]`` for encoders), dynamic B and T, no cache.
  Also takes any ``nn.Module`` with ``example_inputs``.
* ``"generate"``: the decoding graph of a causal LM with a static key/value cache
  (transformers' ``TorchExportableModuleWithStaticCache``),
  ``(input_ids [1, T], cache_position [T]) -> logits [1, T, V]``, 1 <= T < L.
  The cache lives in buffers of the graph module and is updated in place, so a
  prefill of T tokens followed by 1-token steps reproduces eager logits.
  ``batch_size`` B > 1 (batched evaluation, ``qdsl.runtime.graphlm``): the cache holds
  B rows, fixed at capture (the cache buffers' first dimension; export makes it a
  constant of the graph), and the graph takes left-padded rows:
  ``(input_ids [B, T], attention_mask [B, L], position_ids [B, T], cache_position [T])``
  (mask 1 on each row's tokens in the cache's L slots, 0 on its pads).

Module paths in the graph carry the wrapper's prefix (``m.`` or ``model.``);
``Captured.prefix`` records it and ``Captured.module_path`` strips it, so names
match ``model.named_modules()``.

Failures raise ``CaptureError`` naming the module (or op) that broke and what to
try, never a raw torch traceback (the original stays as ``__cause__``).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import linecache
import logging
import os
import re
import traceback
from dataclasses import dataclass

import torch
from torch.export import Dim
from transformers import GenerationConfig
from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

from qdsl.errors import CaptureError

log = logging.getLogger(__name__)

MODES = ("plain", "generate")
# a direct capture() call's cache (tests, tools): small on purpose. qdsl compile always
# passes its own, qdsl.models.limits.DEFAULT_MAX_CACHE_LEN (1024) fitted to the model
CAPTURE_CACHE_LEN = 256
# Example sizes: avoid 0/1, which export would specialise on.
EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 8
MAX_SEQ_FALLBACK = 2048


@dataclass
class Captured:
    """A captured model: the fx graph module and where it came from."""

    gm: torch.fx.GraphModule          # ExportedProgram.module(): callable, params as get_attr
    program: torch.export.ExportedProgram
    mode: str                         # "plain" | "generate"
    source: torch.nn.Module           # the model that was captured
    prefix: str = ""                  # module-path prefix added by a wrapper ("m.", "model.")

    def module_path(self, path: str) -> str:
        """``"m.transformer.h.0.attn"`` -> ``"transformer.h.0.attn"`` (the source's path)."""
        if self.prefix and path.startswith(self.prefix):
            return path[len(self.prefix):]
        return "" if path + "." == self.prefix else path


class _PaddedStaticCache(TorchExportableModuleWithStaticCache):
    """The static-cache wrapper with a padding mask and positions per row (batch > 1)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        for layer in self.static_cache.layers:   # as the parent: write from cache_position
            layer.cumulative_length.copy_(cache_position[0])
        kw = "cache" if "cache" in _forward_params(self.model) else "past_key_values"
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids, use_cache=True,
                          **{kw: self.static_cache}).logits


def _forward_params(model: torch.nn.Module):
    return inspect.signature(model.forward).parameters


class _LogitsOf(torch.nn.Module):
    """Wrap a transformers model so the graph's single output is a tensor."""

    def __init__(self, model: torch.nn.Module, field: str):
        super().__init__()
        self.m, self.field = model, field

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [B, T] -> logits [B, T, V] or last_hidden_state [B, T, D]
        return getattr(self.m(input_ids=input_ids, use_cache=False), self.field)


def capture(model: torch.nn.Module, example_inputs: tuple | None = None, *,
            mode: str = "plain", dynamic_shapes=None,
            max_cache_len: int = CAPTURE_CACHE_LEN, batch_size: int = 1) -> Captured:
    """Export ``model`` to an fx graph; see the module docstring for the modes.

    ``example_inputs``: for a plain ``nn.Module`` the positional inputs (required);
    for a transformers model optional ``(input_ids,)``. ``dynamic_shapes`` is passed
    to ``torch.export.export`` for plain modules (transformers models get dynamic
    batch and sequence dims automatically). ``batch_size``: the generate graph's rows
    (its static cache's batch), 1 unless evaluating in batches.
    """
    if mode not in MODES:
        raise CaptureError(f"unknown capture mode {mode!r}", hint=f"use one of {MODES}")
    model = model.eval()
    if mode == "generate":
        return _capture_generate(model, example_inputs, max_cache_len, batch_size)
    if _is_transformers(model):
        return _capture_hf(model, example_inputs)
    if example_inputs is None:
        raise CaptureError(f"cannot capture {type(model).__name__} without example inputs",
                           hint="pass example_inputs=(tensor, ...) matching its forward()")
    program = _export(model, tuple(example_inputs), dynamic_shapes=dynamic_shapes)
    return Captured(program.module(), program, "plain", model, "")


def _is_transformers(model: torch.nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model.config, "model_type")


def _use_eager_attention(model: torch.nn.Module) -> None:
    """Eager attention keeps Q x K, softmax and probs x V as separate graph nodes."""
    if getattr(model.config, "_attn_implementation", None) == "eager":
        return
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:
        model.config._attn_implementation = "eager"


def max_positions(model: torch.nn.Module) -> int:
    """The model's position-table size (the longest sequence it can take)."""
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(getattr(config, key, None), int):
            return int(getattr(config, key))
    return MAX_SEQ_FALLBACK


def _example_ids(model: torch.nn.Module, batch: int, seq: int) -> torch.Tensor:
    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    generator = torch.Generator().manual_seed(0)
    return torch.randint(1 if vocab > 1 else 0, vocab, (batch, seq), generator=generator)


def _capture_hf(model: torch.nn.Module, example_inputs: tuple | None) -> Captured:
    _use_eager_attention(model)
    field = "last_hidden_state" if _is_encoder(model) else "logits"
    wrapper = _LogitsOf(model, field)
    ids = example_inputs[0] if example_inputs else _example_ids(model, EXAMPLE_BATCH, EXAMPLE_SEQ)
    # Dim max: one below the position table; min 2 so 0/1 never specialise a guard.
    shapes = {"input_ids": {0: Dim("batch", min=1, max=1024),
                            1: Dim("seq", min=1, max=max_positions(model) - 1)}}
    program = _export(wrapper, (ids,), dynamic_shapes=shapes, source=model, prefix="m.")
    return Captured(program.module(), program, "plain", model, "m.")


def _is_encoder(model: torch.nn.Module) -> bool:
    """BERT-like: no language-model head, so the graph returns the hidden states."""
    return model.get_output_embeddings() is None and not getattr(model.config, "is_decoder", False)


def _capture_generate(model: torch.nn.Module, example_inputs: tuple | None,
                      max_cache_len: int, batch_size: int = 1) -> Captured:
    if not _is_transformers(model) or _is_encoder(model):
        raise CaptureError(f"mode 'generate' needs a causal LM, got {type(model).__name__}",
                           hint="use mode='plain' for encoders and plain modules")
    if batch_size < 1:
        raise CaptureError(f"batch_size {batch_size}: a generate graph needs at least 1 row")
    _use_eager_attention(model)
    length = min(max_cache_len, max_positions(model))
    model.generation_config = GenerationConfig(
        use_cache=True, cache_implementation="static", max_length=length,
        cache_config={"batch_size": batch_size, "max_cache_len": length, "device": "cpu"})
    cls = TorchExportableModuleWithStaticCache if batch_size == 1 else _PaddedStaticCache
    try:
        wrapper = cls(model, batch_size=batch_size, max_cache_len=length)
    except Exception as exc:  # transformers rejects models it cannot cache statically
        raise CaptureError(f"{type(model).__name__} has no static key/value cache: {exc}",
                           hint="use mode='plain'") from exc
    rows = 1 if batch_size == 1 else batch_size
    ids = (example_inputs[0][:1].expand(rows, -1) if example_inputs
           else _example_ids(model, rows, EXAMPLE_SEQ))
    seq = Dim("seq", min=1, max=length - 1)
    inputs = {"input_ids": ids, "cache_position": torch.arange(ids.shape[1])}
    shapes = {"input_ids": {1: seq}, "cache_position": {0: seq}}
    if batch_size > 1:   # the batch is the cache's: static; the mask spans the cache
        inputs["attention_mask"] = torch.ones(rows, length, dtype=torch.long)
        inputs["position_ids"] = torch.arange(ids.shape[1]).expand(rows, -1).clone()
        shapes.update(attention_mask=None, position_ids={1: seq})
    program = _export(wrapper, (), kwargs=inputs, dynamic_shapes=shapes, source=model,
                      prefix="model.")
    return Captured(program.module(), program, "generate", model, "model.")


def _export(module: torch.nn.Module, args: tuple, *, kwargs: dict | None = None,
            dynamic_shapes=None, source: torch.nn.Module | None = None,
            prefix: str = "") -> torch.export.ExportedProgram:
    """``torch.export.export(strict=False)``; any failure becomes a CaptureError."""
    try:
        with torch.no_grad(), _quiet(_NOISY_LOGGERS):
            return torch.export.export(module, args, kwargs=kwargs,
                                       dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:
        raise _explain_failure(exc, source or module, module, prefix) from exc


# torch loggers that print graph dumps on an export failure we report ourselves
_NOISY_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._subclasses.fake_tensor",
                  "torch.export", "torch._export")


@contextlib.contextmanager
def _quiet(names: tuple[str, ...]):
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    swallowed = io.StringIO()  # torch writes graph dumps to stderr on some failures
    try:
        with contextlib.redirect_stderr(swallowed):
            yield
    finally:
        if swallowed.getvalue():
            log.debug("torch.export stderr:\n%s", swallowed.getvalue())
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# (pattern in the exception text, what went wrong, what to try)
_FAILURES: tuple[tuple[str, str, str], ...] = (
    (r"data.dependent|GuardOnDataDependent|Could not guard|Could not extract specialized",
     "uses data-dependent control flow (a Python branch or loop on tensor values)",
     "rewrite that branch with torch.where / torch.cond, or capture with fixed inputs"),
    (r"Constraints violated|specialized|not in range|Not all values of",
     "specialises a dynamic dimension (its shape is used as a constant)",
     "pass example_inputs of another size, or dynamic_shapes=None for static shapes"),
    (r"sdpa|flash|attn_implementation",
     "uses an attention kernel export cannot split into nodes",
     "set attn_implementation='eager'"),
    (r"missing .*positional argument|unexpected keyword|takes .* positional",
     "was called with the wrong example inputs",
     "pass example_inputs matching its forward() signature"),
)


def _explain_failure(exc: Exception, source: torch.nn.Module, root: torch.nn.Module,
                     prefix: str) -> CaptureError:
    text = f"{type(exc).__name__}: {exc}"
    where, line = _failing_frame(exc, source, root, prefix)
    what, hint = "could not be exported", "pass example_inputs, or simplify the module's forward()"
    for pattern, reason, advice in _FAILURES:
        if re.search(pattern, text, flags=re.IGNORECASE):
            what, hint = reason, advice
            break
    first = text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__
    message = f"cannot capture {type(source).__name__}: {where[1]} {what}"
    if line:
        message += f" (at `{line}`)"
    return CaptureError(f"{message}; torch said: {first}", node=where[0], hint=hint)


def _failing_frame(exc: BaseException, source: torch.nn.Module, root: torch.nn.Module,
                   prefix: str) -> tuple[tuple[str | None, str], str]:
    """The innermost traceback frame running a module's own code.

    Returns ((module path, "module PATH (Class)"), source line); frames inside
    torch itself (``Module.__call__``, export machinery) are skipped.
    """
    paths = {id(mod): name for name, mod in root.named_modules()}
    found, line = (None, f"module {type(source).__name__}"), ""
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        code = frame.f_code
        owner = frame.f_locals.get(code.co_varnames[0]) if code.co_argcount else None
        if not (isinstance(owner, torch.nn.Module) and id(owner) in paths):
            continue
        if f"{os.sep}torch{os.sep}" in frame.f_code.co_filename:
            continue
        path = paths[id(owner)]
        path = (path[len(prefix):] if prefix and path.startswith(prefix) else path) or "<root>"
        found = (path, f"module {path} ({type(owner).__name__})")
        line = _source_line(frame.f_code.co_filename, lineno)
    return found, line


def _source_line(filename: str, lineno: int) -> str:
    return linecache.getline(filename, lineno).strip()
