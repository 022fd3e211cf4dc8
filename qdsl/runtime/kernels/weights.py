"""The packed low-bit weight the kernel table's ``w4`` / ``w1`` / ``w1a8`` entries take.

``PackedWeight`` holds what every width shares: uint8 ``packed [N, bytes]`` (the width's
byte layout), float32 ``scale [N, G]``, ``in_features`` (K), ``group_size`` (K for per
channel), the bias, ``dequant()`` -> float32 ``[N, K]`` (the ``float_gemm`` fallback's
weight, built per call) and ``owner``, where a kernel's derived forms are kept
(``impls.derived``). A width is a subclass naming its ``BITS`` and the kernels that can
take it (``supports``): ``impls.W4``, ``binary.W1``. Nothing here is saved: the runtime
modules' buffers are (``runtime/packed.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

from torch import Tensor


@dataclass
class PackedWeight:
    """A packed weight of ``BITS`` bits a value (module docstring)."""

    BITS: ClassVar[int]

    packed: Tensor
    scale: Tensor
    in_features: int
    group_size: int
    bias: Tensor | None
    dequant: Callable[[], Tensor]
    owner: object = field(default=None, repr=False)

    def supports(self, name: str) -> bool:
        """Whether candidate ``name`` can run this weight (the caller falls back to
        ``float_gemm`` where not); every candidate by default."""
        return True


def contiguous(t: Tensor | None) -> Tensor | None:
    """Contiguous (the C++ kernels' layout; a no-op for the runtime modules' buffers, a
    copy for a weight stored transposed, e.g. GPT-2's Conv1D turned around)."""
    return None if t is None else t.contiguous()
