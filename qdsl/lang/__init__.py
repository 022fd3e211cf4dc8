"""The .qrec recipe language: parser, checker, formatter, presets (never imports torch).

    >>> r = parse_recipe("block.*.res_sum -> a16")
    >>> r.rules[0].activation.bits
    16
"""

from .formatter import format_text, render_meaning, render_rule
from .loader import check_file, load_recipe, parse_recipe, resolve_include
from .presets import PRESETS

__all__ = ["PRESETS", "check_file", "format_text", "load_recipe", "parse_recipe",
           "render_meaning", "render_rule", "resolve_include"]
