"""Scores for line completion, the CodeXGLUE way (``Code-Code/CodeCompletion-line``).

* exact match: the whitespace-split tokens agree, ``pred.split() == target.split()``;
  ``"x  = 1"`` matches ``"x = 1"``, ``"x=1"`` does not.
* edit similarity: rapidfuzz ``fuzz.ratio`` (0-100), a normalised Levenshtein
  similarity on the stripped strings: ``fuzz.ratio("return x", "return y")`` = 87.5
  (one substitution in 16 characters: 100 * (1 - 2/16)).
"""

from __future__ import annotations

import math

from rapidfuzz import fuzz


def exact_match(pred: str, target: str) -> bool:
    return pred.split() == target.split()


def edit_similarity(pred: str, target: str) -> float:
    return float(fuzz.ratio(pred.strip(), target.strip()))


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(mean negative log-likelihood per token); nats in."""
    return math.exp(nll_sum / n_tokens) if n_tokens else float("nan")


def bits_per_byte(nll_sum: float, n_bytes: int) -> float:
    """Total NLL (nats) as bits per UTF-8 byte: comparable across tokenizers."""
    return nll_sum / math.log(2) / n_bytes if n_bytes else float("nan")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass (Chen et al. 2021):
    1 - C(n-c, k) / C(n, k). pass_at_k(1, 1, 1) = 1.0; pass_at_k(10, 3, 1) = 0.3."""
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod
