"""Hypothesis strategies shared by the test suite, gathered in one place."""

from __future__ import annotations

from hypothesis import strategies as st  # noqa: F401

# --- language (recipes, selectors, specs) ----------------------------------


# --- quantizer maths (tensors, ranges, bit widths) -------------------------
