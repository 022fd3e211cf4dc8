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


_SIGNED: dict[int, Tensor] = {}


def signed_table(bits: int) -> Tensor:
    """float32 ``[256, 8 // bits]``: the signed codes a byte holds, in order (1 bit:
    -1 / +1; otherwise ``u - 2^(bits-1)``). One lookup per byte unpacks a row in one pass
    (``unpack_signed``), where shifting and masking takes five."""
    t = _SIGNED.get(bits)
    if t is None:
        shifts = torch.arange(0, 8, bits, dtype=torch.int64)
        u = ((torch.arange(256)[:, None] >> shifts) & (2**bits - 1)).float()
        t = _SIGNED[bits] = (u * 2 - 1 if bits == 1 else u - 2 ** (bits - 1)).contiguous()
    return t


def unpack_signed(packed: Tensor, bits: int, n: int) -> Tensor:
    """uint8 ``[rows, bytes]`` -> the signed codes as float32 ``[rows, n]``."""
    _per_byte(bits)
    table = signed_table(bits).to(packed.device)
    w = torch.nn.functional.embedding(packed.reshape(-1).to(torch.int32), table)
    w = w.reshape(*packed.shape[:-1], -1)
    return w if w.shape[-1] == n else w[..., :n]


def unpack_int(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of ``pack_int``: uint8 ``[..., bytes]`` -> uint8 ``[..., n]``."""
    per = _per_byte(bits)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    u = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)     # [..., bytes, per]
    return u.reshape(*packed.shape[:-1], -1)[..., :n]


def dequantize_packed(packed: Tensor, scale: Tensor, bits: int, n: int) -> Tensor:
    """uint8 ``[rows, bytes]`` + scale ``[rows, G]`` -> float32 ``[rows, n]``."""
    q = unpack_signed(packed, bits, n)                               # [rows, n] float32
    rows, groups = scale.shape
    w = q.reshape(rows, groups, n // groups)
    w.mul_(scale.unsqueeze(-1))   # the codes are exact in float32: dequantize's product
    return w.reshape(rows, n)
