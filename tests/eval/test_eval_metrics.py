import math

import pytest

from qdsl.eval.metrics import (bits_per_byte, edit_similarity, exact_match, mean,
                               pass_at_k, perplexity)


def test_exact_match_is_whitespace_split_equality():
    assert exact_match("x  = 1", "x = 1")
    assert exact_match("  return x\t", "return x")
    assert not exact_match("x=1", "x = 1")
    assert exact_match("", "   ")


@pytest.mark.parametrize("pred,target,es", [
    ("return x", "return x", 100.0),
    ("return x", "return y", 87.5),        # 1 substitution = 2 indel edits in 16 chars
    ("abc", "xyz", 0.0),
    ("", "abc", 0.0),
    ("  return x ", "return x", 100.0),     # stripped first
    ("abcd", "abce", 75.0),
])
def test_edit_similarity_exact_values(pred, target, es):
    assert edit_similarity(pred, target) == pytest.approx(es)


def test_perplexity_and_bits_per_byte():
    assert perplexity(4 * math.log(2), 4) == pytest.approx(2.0)
    assert bits_per_byte(8 * math.log(2), 4) == pytest.approx(2.0)
    assert math.isnan(perplexity(1.0, 0)) and math.isnan(mean([]))


def test_pass_at_k():
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 1, 2) == pytest.approx(1 - (4 * 3) / (5 * 4))
