"""The searches behind the sample-based observers (``MSEObserver``,
``PercentileObserver`` in ``qdsl.quant.observers``): tensors in, tensors out.

* ``mse_search``: per group, the clipping range with the least squared fake-quant error.
* ``kth_percentile``: the nearest-rank percentile of each row.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qdsl.quant.primitives import choose_qparams, qrange

_CHUNK = 2**18  # elements of a block of the MSE search: [candidates, groups, values] (L2-sized)


def _sq_errors(v: Tensor, lo: Tensor, hi: Tensor, bits: int, symmetric: bool) -> Tensor:
    """Squared fake-quant error of each candidate window: v [G, m], lo/hi [C, G] -> [C, G]
    (float64).

    The same arithmetic as ``fake_quantize`` (so the winner's error is what it will
    reproduce), in place, in blocks of at most 2^18 elements that stay in the L2 cache:
    a few groups (or a slice of one long group: a per-tensor weight) times a few
    candidates, every candidate of a block of values before the next block. Each block's
    sum is float32 (torch's cascade sum), the blocks of a group add up in float64.
    1 thread: 0.3 s for 100 candidates on a 4864 x 896 weight per tensor (1.7 s when
    each candidate streamed the whole weight from memory).
    """
    qmin, qmax = qrange(bits, symmetric)
    n_groups, m = v.shape
    scale, zp = choose_qparams(lo, hi, bits, symmetric)      # [C, G]
    inv = 1.0 / scale
    mb = min(m, _CHUNK)                                       # values of a group per block
    gb = max(1, min(n_groups, _CHUNK // mb))                  # groups per block
    cb = max(1, _CHUNK // (gb * mb))                          # candidates per block
    out = torch.zeros(lo.shape, dtype=torch.float64, device=v.device)
    for g in range(0, n_groups, gb):
        for c in range(0, lo.shape[0], cb):
            s, i = scale[c:c + cb, g:g + gb, None], inv[c:c + cb, g:g + gb, None]
            z = None if symmetric else zp[c:c + cb, g:g + gb, None].float()
            acc = out[c:c + cb, g:g + gb]
            for k in range(0, m, mb):
                x = v[g:g + gb, k:k + mb]
                q = (x * i).round_()                          # [c, g, m']
                if symmetric:
                    err = q.clamp_(qmin, qmax).mul_(s).sub_(x)
                else:
                    err = q.add_(z).clamp_(qmin, qmax).sub_(z).mul_(s).sub_(x)
                acc += err.square_().sum(-1)
    return out


def mse_search(v: Tensor, lo: Tensor, hi: Tensor, bits: int, symmetric: bool,
               candidates: int = 100) -> tuple[Tensor, Tensor]:
    """Per group, the clipping range with the least squared fake-quant error on v.

    v: [G, m] values; lo, hi: [G] full ranges. With a_k = k / n, k = 1..n (n = candidates):
    symmetric tries [-a_k A, a_k A], A = max(|lo|, |hi|). Asymmetric (window [lo', hi']
    widened to include 0): 1) [a_k lo', a_k hi'] (shrink towards 0), then with the best
    upper end fixed 2) [a_k lo', hi*], then 3) [lo*, a_k hi*] -- 3n evaluations instead of
    the seeds' n^2 grid. a_n = 1 is the min-max range and every stage contains the previous
    winner, so the result is never worse than min-max on v. Ties go to the smaller k.
    """
    a = torch.arange(1, candidates + 1, dtype=torch.float32, device=v.device)[:, None] / candidates

    def best(cl: Tensor, ch: Tensor) -> tuple[Tensor, Tensor]:  # cl, ch [n, G]
        i = _sq_errors(v, cl, ch, bits, symmetric).argmin(0, keepdim=True)  # [1, G]
        return cl.gather(0, i)[0], ch.gather(0, i)[0]

    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        return best(-a * amax, a * amax)
    lo0, hi0 = lo.clamp(max=0.0), hi.clamp(min=0.0)
    bl, bh = best(a * lo0, a * hi0)
    if bool((lo0 < 0).any()):
        bl, bh = best(a * lo0, bh.expand(candidates, -1))
    if bool((hi0 > 0).any()):
        bl, bh = best(bl.expand(candidates, -1), a * hi0)
    return bl, bh


def kth_percentile(v: Tensor, p: float) -> Tensor:
    """Nearest-rank p-th percentile of each row of v [G, m] -> [G]:
    the ceil(p/100 * m)-th smallest. p = 50 of (1, 2, 3, 4) -> 2; p = 100 -> the max."""
    m = v.shape[1]
    k = min(max(math.ceil(p / 100.0 * m), 1), m)
    return v.kthvalue(k, dim=1).values
