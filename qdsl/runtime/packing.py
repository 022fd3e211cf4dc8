"""Bit packing: ``bits``-wide unsigned integers stored several to a byte.

Value ``j`` of a row lives in byte ``j // (8 // bits)`` at bit offset
``(j % (8 // bits)) * bits`` (little end first). Rows are padded with zeros to
a whole number of bytes. 4 bits: two values a byte, 2 bits: four, 1 bit: eight.

>>> pack_int(torch.tensor([[1, 2, 15]]), 4).tolist()   # 0x21, 0x0F
[[33, 15]]
"""

from __future__ import annotations

import torch
from torch import Tensor

PACKED_BITS = (1, 2, 4, 8)


def _per_byte(bits: int) -> int:
    if bits not in PACKED_BITS:
        raise ValueError(f"packing needs bits in {PACKED_BITS}, got {bits}")
    return 8 // bits


def packed_len(n: int, bits: int) -> int:
    """Bytes per row of ``n`` values."""
    per = _per_byte(bits)
    return (n + per - 1) // per


def pack_int(q: Tensor, bits: int) -> Tensor:
    """Unsigned ints in ``[0, 2^bits)`` along the last dim -> uint8 ``[..., packed_len(n)]``."""
    per, n = _per_byte(bits), q.shape[-1]
    pad = packed_len(n, bits) * per - n
    u = torch.nn.functional.pad(q.to(torch.uint8), (0, pad))
    u = u.reshape(*q.shape[:-1], -1, per)                    # [..., bytes, per]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=q.device)
    return (u << shifts).sum(-1, dtype=torch.uint8)          # disjoint bits: sum == or


def unpack_int(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of ``pack_int``: uint8 ``[..., bytes]`` -> uint8 ``[..., n]``."""
    per = _per_byte(bits)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    u = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)     # [..., bytes, per]
    return u.reshape(*packed.shape[:-1], -1)[..., :n]
