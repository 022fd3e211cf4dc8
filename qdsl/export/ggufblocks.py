"""GGUF block types from qdsl's codes and scales, and the exactness rule.

Blocks of 32 consecutive columns of one row, each with an fp16 scale ``d``
(llama.cpp's ``ggml-quants.c`` layouts, written here from qdsl's own integers):

* ``Q8_0``: ``d`` then 32 int8 codes; value ``d * q``. Carries a symmetric grid of
  5-8 bits.
* ``Q4_0``: ``d`` then 16 bytes; byte ``j`` holds column ``j`` in its low nibble and
  column ``j + 16`` in its high one, stored ``q + 8``; value ``d * (nibble - 8)``.
  Carries a symmetric grid of 2-4 bits (qdsl's 4-bit grid is [-7, 7]).
* ``Q4_1``: ``d``, ``m`` then the 16 bytes as Q4_0 without the offset; value
  ``d * nibble + m``. Carries an asymmetric grid of 1-4 bits: ``d = scale``,
  ``m = -scale * zero_point``.

**Exact** means llama.cpp's own dequantization of the written blocks (gguf-py's,
the same arithmetic) reproduces, bit for bit, every value qdsl computes with
(``(q - zero_point) * scale`` in float32). That needs groups of exactly 32 columns,
codes inside the block type's range and fp16 values for ``d`` and ``m``: qdsl's
scales are float32, so a recipe meant for GGUF says ``set export = gguf`` and the
compile rounds them up to fp16. Anything else is re-rounding: refused, or with
``--requantize`` re-quantized by gguf-py's reference quantizer (llama.cpp's
rounding) from qdsl's dequantized weight, with the error reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .weights import Weight

QK = 32  # columns per block (Q8_0, Q4_0, Q4_1)


@dataclass(frozen=True)
class Verdict:
    """How one weight goes into GGUF: ``qtype`` (a GGMLQuantizationType name) and,
    when it cannot go exactly, ``reason`` and the nearest spec that would."""

    qtype: str
    reason: str | None = None
    nearest: str | None = None

    @property
    def exact(self) -> bool:
        return self.reason is None


def nearest_spec(bits: int, symmetric: bool) -> str:
    if bits <= 4:
        return f"w4 {'sym' if symmetric else 'asym'} group(size=32)"
    return "w8 sym group(size=32)"


def block_type(w: Weight) -> Verdict:
    """The block type a quantized weight maps to, and why it is not exact if it is not
    (fp16 scales are checked by ``encode``: that needs the values)."""
    spec = w.spec
    qtype = ("Q8_0" if spec.bits > 4 else "Q4_0") if spec.symmetric else "Q4_1"
    nearest = nearest_spec(spec.bits, spec.symmetric)
    if not spec.symmetric and spec.bits > 4:
        return Verdict("Q8_0", f"{spec.bits}-bit asymmetric grid: Q8_0 has no zero point",
                       nearest)
    if w.tensor.shape[1] % QK or w.group != QK:
        what = (f"groups of {w.group} columns" if w.scale.shape[1] > 1 else
                "one scale per row" if w.scale.shape[0] > 1 and w.scale.unique().numel() > 1
                else "one scale per tensor")
        if w.tensor.shape[1] % QK:
            return Verdict("F16", f"rows of {w.tensor.shape[1]} columns, not a multiple of "
                                  f"GGUF's {QK}-column blocks", "fp16")
        return Verdict(qtype, f"{what}; GGUF blocks are {QK} columns, each with its own "
                              "scale", nearest)
    return Verdict(qtype)


def _fp16_exact(x: np.ndarray) -> bool:
    return bool(np.array_equal(x.astype(np.float16).astype(np.float32), x))


def encode(w: Weight, qtype: str) -> tuple[np.ndarray, str | None]:
    """(uint8 blocks [rows, bytes], None) written from qdsl's codes and scales, or
    (None-free blocks, reason) when they would not reproduce qdsl's values."""
    codes = w.codes.numpy().astype(np.int32)
    rows, cols = codes.shape
    nb = cols // QK
    scale = w.scale.numpy().astype(np.float32)                 # [rows, nb]
    q = codes.reshape(rows, nb, QK)
    d = scale.astype(np.float16).reshape(rows, nb, 1).view(np.uint8)
    reason = None if _fp16_exact(scale) else ("its scales are not fp16 values (compile with "
                                              "`set export = gguf`, which rounds them up)")
    if qtype == "Q8_0":
        lo, hi = -128, 127
        body = [d, q.astype(np.int8).view(np.uint8)]
    else:
        offset = 8 if qtype == "Q4_0" else 0
        lo, hi = -offset, 15 - offset
        nib = (q + offset).clip(0, 15).astype(np.uint8)
        packed = nib[..., :QK // 2] | (nib[..., QK // 2:] << np.uint8(4))
        body = [d, packed]
        if qtype == "Q4_1":
            m = -scale * w.zero_point.numpy().astype(np.float32)
            if reason is None and not _fp16_exact(m):
                reason = "its minima (-scale * zero_point) are not fp16 values"
            body = [d, m.astype(np.float16).reshape(rows, nb, 1).view(np.uint8), packed]
    if reason is None and (codes.min() < lo or codes.max() > hi):
        reason = f"codes outside {qtype}'s range [{lo}, {hi}]"
    return np.concatenate(body, axis=-1).reshape(rows, -1), reason


def dequantize(blocks: np.ndarray, qtype: str) -> np.ndarray:
    """float32 values of GGUF ``blocks`` (gguf-py's dequantizer, llama.cpp's arithmetic)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    return gguf_dequantize(blocks, GGMLQuantizationType[qtype]).astype(np.float32)


def exact_blocks(w: Weight, qtype: str) -> tuple[np.ndarray, str | None]:
    """``encode``, then proven: the blocks' dequantization must equal qdsl's weight."""
    blocks, reason = encode(w, qtype)
    if reason is None:
        back = dequantize(blocks, qtype)
        if not np.array_equal(back, w.tensor.numpy()):
            bad = np.abs(back - w.tensor.numpy()).max()
            reason = f"the blocks do not reproduce qdsl's values (max |diff| {bad:.3g})"
    return blocks, reason


def requantize(x: torch.Tensor, qtype: str) -> tuple[np.ndarray, dict]:
    """``x`` (float32 [rows, cols]) re-quantized to ``qtype`` by gguf-py's reference
    quantizer; with the error against ``x``: max |diff| and relative RMS."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    a = x.numpy().astype(np.float32)
    if qtype == "F16":
        data = a.astype(np.float16)
        back = data.astype(np.float32)
    else:
        data = gguf_quantize(a, GGMLQuantizationType[qtype])
        back = dequantize(data, qtype)
    err = back - a
    norm = float(np.sqrt((a.astype(np.float64) ** 2).sum())) or 1.0
    rms = float(np.sqrt((err.astype(np.float64) ** 2).sum()))
    return data, {"max_abs_error": float(np.abs(err).max()), "rel_rms_error": rms / norm}
