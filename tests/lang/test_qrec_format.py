"""Formatter: canonical output, comments kept, alignment, idempotence, round trip."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from qdsl.lang import format_text, parse_recipe, render_rule
from strategies import rules

MESSY = """\
# header comment


set   calib.samples=128    # samples
*   ->   w8 mse per_channel sym ,a8 minmax asym   # base
block.*.res_sum->a16
    # an indented comment stays put
mlp.c_fc -> w8 per_group( K = 8 , permute )
include   "storti/base.qrec"



lm_head ? -> skip
attn.* -> w8a8 a.dynamic w.mse
"""

CANONICAL = """\
# header comment

set calib.samples = 128  # samples
*               -> w8 sym per_channel mse, a8 asym minmax  # base
block.*.res_sum -> a16
    # an indented comment stays put
mlp.c_fc        -> w8 per_group(K=8, permute)
include "storti/base.qrec"

lm_head? -> skip
attn.*   -> w8a8 w.mse, dynamic
"""


def test_canonical_form():
    assert format_text(MESSY) == CANONICAL


def test_idempotent_and_same_meaning():
    once = format_text(MESSY)
    assert format_text(once) == once
    a, b = parse_recipe(MESSY), parse_recipe(once)
    assert (a.rules, a.settings) == (b.rules, b.settings)


def test_card_lines_format_as_written():
    card = "block.*.res_sum -> a16\nmlp.c_fc        -> w8 per_group(K=8, permute)\n"
    assert format_text(card) == card


def test_empty_and_comment_only():
    assert format_text("") == ""
    assert format_text("\n\n") == ""
    assert format_text("#a  \n\n\n#b\n") == "#a\n\n#b\n"


def test_long_selector_does_not_widen_block():
    text = "x -> w8\n" + "a" * 50 + " -> a8\nyy -> a8\n"
    assert format_text(text) == "x  -> w8\n" + "a" * 50 + " -> a8\nyy -> a8\n"


def test_float_and_unbound_options():
    assert format_text("* -> w.fp16 a.fp16\n") == "* -> fp16\n"
    assert format_text("* -> a.sym w.sym\n") == "* -> w.sym, a.sym\n"
    assert format_text("* -> per_token w.per_tensor\n") == "* -> w.per_tensor per_token\n"
    assert format_text("* -> a8 w32\n") == "* -> w32, a8\n"


@given(rules)
def test_rule_round_trip(rule):
    text = render_rule(rule)
    (back,) = parse_recipe(text).rules
    assert back == rule, text
    assert format_text(text + "\n") == text + "\n"


@given(st.lists(rules, max_size=6), st.lists(st.sampled_from(["", "# c", "  # d"]), max_size=6))
def test_file_round_trip_and_idempotence(rs, extra):
    lines = [render_rule(r) for r in rs] + extra
    text = "\n".join(lines) + "\n"
    once = format_text(text)
    assert format_text(once) == once
    assert parse_recipe(once).rules == parse_recipe(text).rules


@given(lr=st.floats(1e-9, 10.0), warmup=st.floats(0.0, 1.0), freeze=st.floats(0.0, 1.0),
       dampen=st.floats(0.0, 1e6), blocks=st.sampled_from(["every_other", '"1,3"', "top_half"]),
       scales=st.sampled_from(["mean", "learned"]))
def test_train_settings_format_then_parse_is_the_identity(lr, warmup, freeze, dampen, blocks,
                                                          scales):
    """`set train.*` / `student.blocks` lines keep their values exactly through fmt."""
    text = (f"set train.lr = {lr!r}\nset train.warmup = {warmup!r}\n"
            f"set train.freeze = {freeze!r}\nset train.dampen = {dampen!r}\n"
            f"set student.blocks = {blocks}\nset train.scales = {scales}\n"
            "* -> w1 sym per_channel\n")
    a = parse_recipe(text)
    assert (a.settings.train_lr, a.settings.train_warmup, a.settings.train_freeze,
            a.settings.train_dampen, a.settings.train_scales) == (lr, warmup, freeze, dampen,
                                                                   scales)
    b = parse_recipe(format_text(text))
    assert (a.rules, a.settings) == (b.rules, b.settings)


def test_numbers_format_in_their_shortest_exact_form():
    text = "set train.lr = 5e-05\nset train.warmup = 0.10\nset train.hidden = 1E-4\n* -> w8\n"
    assert format_text(text).splitlines()[:3] == [
        "set train.lr = 5e-5", "set train.warmup = 0.1", "set train.hidden = 0.0001"]
