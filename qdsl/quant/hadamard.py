"""Orthonormal Hadamard matrices for rotations (QuaRot, Ashkboos et al. 2024).

``hadamard(n)`` is H / sqrt(n) with H a Hadamard matrix (entries +-1, H H^T = n I):
Sylvester's construction for powers of two, and for n = m * 2^k with m a Paley order
(m = q + 1, q a prime = 3 mod 4: Paley I; m = 2(q + 1), q a prime = 1 mod 4: Paley II)
the Kronecker product H_m (x) H_{2^k}. That covers the sizes of the models qdsl runs:
576 = 36 * 16 (SmolLM2 hidden), 1536 = 12 * 128 (its MLP), 896 = 28 * 32 and
4864 = 76 * 64 (Qwen2.5-0.5B). ``hadamard_factors`` says which (or None).
``apply_hadamard`` multiplies by it with small dense products: the 2^k factor split into
Sylvester factors of order <= 128, then the m x m factor.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _paley(m: int) -> Tensor | None:
    """A Hadamard matrix of order m by Paley's constructions, or None."""
    def jacobsthal(q: int) -> Tensor:
        squares = {(i * i) % q for i in range(1, q)}
        chi = [0] + [1 if a in squares else -1 for a in range(1, q)]
        return torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)],
                            dtype=torch.float64)
    q = m - 1
    if _is_prime(q) and q % 4 == 3:                                    # Paley I
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jacobsthal(q)
        return torch.eye(m, dtype=torch.float64) + s
    q = m // 2 - 1
    if m % 2 == 0 and _is_prime(q) and q % 4 == 1:                     # Paley II
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, jacobsthal(q)
        a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    return None


@lru_cache(maxsize=64)
def hadamard_factors(n: int) -> tuple[int, int] | None:
    """(m, 2^k) with n = m * 2^k and a Hadamard matrix of order m known (1, 2 or Paley),
    the largest power of two first; None when there is none. Cached: deciding builds
    Paley matrices, which an online rotation must not do per call."""
    p = n & -n if n > 0 else 0
    while p >= 1:
        m = n // p
        if m in (1, 2) or _paley(m) is not None:
            return m, p
        p //= 2
    return None


@lru_cache(maxsize=16)
def _small(m: int) -> Tensor:
    h = torch.ones(1, 1, dtype=torch.float64) if m == 1 else \
        torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) if m == 2 else _paley(m)
    return h / math.sqrt(m)


@lru_cache(maxsize=16)
def hadamard(n: int) -> Tensor:
    """The orthonormal n x n Hadamard matrix (float64); ValueError when none is known."""
    f = hadamard_factors(n)
    if f is None:
        raise ValueError(f"no Hadamard matrix of order {n} is known to qdsl "
                         "(orders m * 2^k with m = 1, 2 or a Paley order)")
    m, p = f
    syl = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(int(math.log2(p))):
        syl = torch.kron(syl, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64))
    return torch.kron(_small(m), syl / math.sqrt(p))


# The 2^k factor is applied as dense products with Sylvester matrices of order <= this
# (H_{ab} = H_a (x) H_b): a handful of small GEMMs instead of k butterfly stages, each
# several tensor ops. Measured, 1 thread, [1, 1536]: 56 us against the butterfly's 200;
# [512, 1536]: 5.5 ms against 17 (docs/algorithms.md, the online Hadamard's cost).
_DENSE = 128


@lru_cache(maxsize=32)
def _factor(n: int, dtype: torch.dtype) -> Tensor:
    """The orthonormal Sylvester (n a power of two) or Paley-based matrix of order n. A
    normal tensor even when first asked for under ``torch.inference_mode`` (a cached
    inference tensor could not be saved for backward by a later autograd pass)."""
    with torch.inference_mode(False):
        return (_small(n) if n <= 2 or n & (n - 1) else hadamard(n)).to(dtype).clone()


def _split(p: int) -> tuple[int, ...]:
    """2^k as factors of at most _DENSE, the largest first."""
    parts = []
    while p > 1:
        parts.append(min(p, _DENSE))
        p //= parts[-1]
    return tuple(parts)


def apply_hadamard(x: Tensor, n: int) -> Tensor:
    """``x @ hadamard(n)`` over the last dimension, fast: for H = H_m (x) H_p, x viewed
    as [.., m, p] becomes H_m^T X H_p; H_p = H_p1 (x) H_p2 (x) .. with each factor of
    order <= 128 applied as a dense product on its own axis (O(n * sum(p_i)))."""
    m, p = hadamard_factors(n)
    shape = x.shape
    parts = _split(p)
    y = x.reshape(-1, m, *parts)
    last = y.dim() - 1
    for axis, b in enumerate(parts, start=2):     # every Sylvester factor is symmetric
        h = _factor(b, x.dtype)
        y = y @ h if axis == last else (y.movedim(axis, last) @ h).movedim(last, axis)
    y = y.reshape(-1, m, p)
    if m > 1:
        y = _factor(m, x.dtype).t() @ y
    return y.reshape(shape)
