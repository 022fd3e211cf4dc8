"""Preset spec words: shorthand for the bit widths of both tensor kinds.

Each preset is spec text, parsed with the recipe parser itself, so a preset
means exactly what its text means when written out. After a preset no tensor
kind is current, so an option valid for both kinds that follows one needs a
`w.` / `a.` prefix (``w8a8 a.sym``); kind-specific options need none
(``w8a8 dynamic``).

Any other ``wNaM`` word (``w3a8``) expands the same way: ``wN, aM``.
"""

from __future__ import annotations

import functools
import re

from .parser import parse_spec_text

PRESETS: dict[str, str] = {
    "w8a8": "w8, a8",      # Storti Table 2, Wei Tables 4/5
    "w8a16": "w8, a16",    # Storti Table 2
    "w8a32": "w8, a32",    # Storti Table 2: weights only (activations stay float)
    "w4a16": "w4, a16",    # Storti Table 2
    "w4a8": "w4, a8",      # Wei Table 5
    "w4a32": "w4, a32",    # Storti Tables 2 and 4
    "w8a4": "w8, a4",      # Wei Table 5
    "w16a16": "w16, a16",
    "w2a16": "w2, a16",
    "w1a8": "w1, a8",      # de Moor (XTC): 1-bit weights, 8-bit activations
    "w32a8": "w32, a8",    # activations only
    "w32a16": "w32, a16",
}

_GENERIC = re.compile(r"w(\d{1,3})a(\d{1,3})")


def preset_text(word: str) -> str | None:
    """Spec text a preset word stands for, or None if ``word`` is not a preset."""
    if word in PRESETS:
        return PRESETS[word]
    m = _GENERIC.fullmatch(word)
    return f"w{m.group(1)}, a{m.group(2)}" if m else None


@functools.cache
def preset_options(word: str):
    """The parsed options of a preset (``parse_spec_text`` of its text)."""
    text = preset_text(word)
    assert text is not None, f"{word!r} is not a preset"
    return parse_spec_text(text)
