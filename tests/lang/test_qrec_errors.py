"""Every error class: exact message, line, column and hint; all errors of a file reported."""

from __future__ import annotations

import pytest

from qdsl.errors import RecipeError
from qdsl.lang import check_file, parse_recipe


def errors(text: str, file: str = "t.qrec"):
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, file)
    return e.value.diagnostics


def one(text: str):
    (d,) = errors(text)
    return d


BITS = "bits must be 1..16, or 32 to keep float; got"
CASES = [
    # (text, col, message, hint or None)
    # syntax
    ("* w8", 3, "expected `->` after the selector, found `w8`", None),
    ("block.*.res_sum", 16, "expected `->` and a spec after the selector",
     "a rule reads `SELECTOR -> SPEC`, e.g. `block.*.res_sum -> a16`"),
    ("* -> ", 5, "missing spec after `->`",
     "a spec is options such as `w8 per_channel`, `a16`, `w8a8` or `skip`"),
    ("* -> # nothing", 6, "missing spec after `->`",
     "a spec is options such as `w8 per_channel`, `a16`, `w8a8` or `skip`"),
    ("* -> per-channel", 9, "unexpected `-`", "option names use `_`: e.g. `per_channel`"),
    ("opp:softmax -> a8", 1, "unknown selector kind `opp:`", "did you mean `op`?"),
    ("block.[0-5.mlp -> w8", 7, "unclosed or malformed `[` in selector",
     "index sets look like `[0-5]` or `[0,2,4-6]`"),
    ('re:"abc -> w8', 4, "unterminated string", 'close it with `"` on the same line'),
    ("* -> per_group(K=8", 19, "missing `)`", None),
    ("* -> w8 per_group((K=8))", 19, "unexpected `(`; expected `)` or a number or a word", None),
    ("include base.qrec", 9, "expected a quoted path after `include`, found `base.qrec`",
     'write include "file.qrec"'),
    ("* -> w8 @", 9, "unexpected character `@`", None),
    # bits
    ("* -> w0", 6, f"weight {BITS} `w0`", None),
    ("* -> a17", 6, f"activation {BITS} `a17`", None),
    ("* -> w64", 6, f"weight {BITS} `w64`", None),
    ("* -> w0a8", 6, f"weight {BITS} `w0a8`", None),
    ("* -> w99999999999999999999", 6, f"weight {BITS} `w99999999999999999999`", None),
    ("* -> w.w8", 6, "a bit width takes no `w.` prefix", "write `w8`"),
    # unknown words and arguments
    ("* -> w8 per_chanel", 9, "unknown option `per_chanel`", "did you mean `per_channel`?"),
    ("* -> a8 pergroup(K=8)", 9, "unknown option `pergroup`", "did you mean `per_group`?"),
    ("* -> w8 granularity=per_channel", 9, "unknown key `granularity=`",
     "only `observer=NAME` is accepted"),
    ("* -> w8 observer=per_channel", 18, "`per_channel` is not an observer",
     "observers are minmax, current_minmax, running_minmax, mse and percentile"),
    ("* -> per_group(k=8)", 16, "unknown argument `k` for `per_group`", "did you mean `K`?"),
    ("* -> per_group(K=8, permut)", 21, "unknown argument `permut` for `per_group`",
     "did you mean `permute`?"),
    ("* -> per_group(K=8, K=4)", 21, "argument `K` given twice", None),
    ("* -> per_group(K=8, permute=1)", 21, "`permute` is a flag: write `permute` without a value",
     None),
    ("* -> a8 per_group", 9, "`per_group` needs K", "e.g. `per_group(K=8, permute)`"),
    ("* -> a8 percentile", 9, "`percentile` needs p", "e.g. `percentile(99.9)`"),
    ("* -> w8 sym(3)", 9, "`sym` takes no arguments", "write `sym`"),
    ("* -> a8 mse(3, 4)", 16, "`mse` takes at most 1 positional argument",
     "name it, e.g. `mse(candidates=100)`"),
    ("* -> w8a8(1)", 6, "preset `w8a8` takes no prefix, key or arguments", "write `w8a8` on its own"),
    # argument values
    ("* -> per_group(K=0)", 16, "K must be an integer >= 1, got 0", None),
    ("* -> per_group(K=2.5)", 16, "K must be an integer >= 1, got 2.5", None),
    ("* -> per_group(K=1e1)", 16, "K must be an integer >= 1, got 10.0", None),
    ("* -> w4 group(size=0)", 15, "group size must be an integer >= 1, got 0", None),
    ("* -> a8 percentile(0)", 20, "percentile must be in (0, 100], got 0", None),
    ("* -> a8 percentile(100.5)", 20, "percentile must be in (0, 100], got 100.5", None),
    ("* -> a8 running_minmax(momentum=1)", 24, "momentum must be in [0, 1), got 1", None),
    ("* -> a8 running_minmax(-0.1)", 24, "momentum must be in [0, 1), got -0.1", None),
    ("* -> w8 mse(candidates=0)", 13, "candidates must be an integer >= 1, got 0", None),
    # contradictions
    ("* -> w8 w4", 9, "`w4` conflicts with `w8`: both set the weights' precision",
     "one rule sets each attribute once; a later rule may override it"),
    ("* -> w8a8 w4", 11, "`w4` conflicts with `w8a8`: both set the weights' precision",
     "one rule sets each attribute once; a later rule may override it"),
    ("* -> w8 w.fp16", 9, "`w.fp16` conflicts with `w8`: both set the weights' precision",
     "one rule sets each attribute once; a later rule may override it"),
    ("* -> a8 sym asym", 13, "`asym` conflicts with `sym`: both set the activations' symmetry",
     "one rule sets each attribute once; a later rule may override it"),
    ("* -> a8 sym sym", 13, "`sym` is given twice for the activations", None),
    ("* -> static dynamic", 13,
     "`dynamic` conflicts with `static`: both set the activations' static/dynamic mode",
     "one rule sets each attribute once; a later rule may override it"),
    ("* -> w8 per_channel group(size=64)", 21,
     "`group(size=64)` conflicts with `per_channel`: both set the weights' granularity",
     "one rule sets each attribute once; a later rule may override it"),
    ("* -> a8 minmax mse", 16, "`mse` conflicts with `minmax`: both set the activations' observer",
     "one rule sets each attribute once; a later rule may override it"),
    ("* -> per_token static", 16,
     "`static` conflicts with `per_token`: per-token activation scales are always dynamic",
     "drop `static`"),
    ("* -> skip w8", 11, "`skip` cannot be combined with other options",
     "skip keeps the node entirely in float; remove the other options"),
    # binding
    ("* -> sym", 6, "`sym` applies to weights and activations: say which",
     "write w.sym or a.sym, or put it after `w8` / `a8`"),
    ("* -> w8a8 mse", 11, "`mse` applies to weights and activations: say which",
     "write w.mse or a.mse, or put it after `w8` / `a8`"),
    ("* -> a.per_channel", 6, "`per_channel` applies to weights only", "drop the `a.` prefix"),
    ("* -> w.per_group(K=8)", 6, "`per_group` applies to activations only",
     "drop the `w.` prefix"),
    # selectors
    ("block..x -> w8", 7, "empty name segment in selector `block..x`",
     "segments are separated by single dots: `block.*.res_sum`"),
    ("block. -> w8", 7, "empty name segment in selector `block.`",
     "segments are separated by single dots: `block.*.res_sum`"),
    ("block.[5-0].x -> a8", 7, "bad index range `5-0`: 5 is greater than 0", None),
    ("block.[a].x -> a8", 7, "bad index set `[a]`",
     "write numbers and ranges, e.g. `[0-5]` or `[0,2,4-6]`"),
    ('re:"block(" -> skip', 10, "invalid regular expression: missing ), unterminated subpattern",
     None),
    ('  re:"a)b" -> skip', 8, "invalid regular expression: unbalanced parenthesis", None),
    ("op: -> a8", 1, "empty `op:` selector", "e.g. `op:softmax`"),
    # the `.input` port (a linear's input activation)
    ('re:"x".inptu -> a8', 7, "unknown port `.inptu`", "did you mean `input`?"),
    ('re:"x".output -> a8', 7, "unknown port `.output`",
     "the one port is `.input`: the input of a linear"),
    ("type:Linear.input -> w8", 22, "weight options on `type:Linear.input`: a `.input` rule "
     "sets the activation the linear reads, which has no weights",
     "write the weight spec in a rule without `.input`, e.g. `type:Linear -> w8`"),
    ("mlp.down.input -> a8 per_channel", 22, "weight options on `mlp.down.input`: a `.input` "
     "rule sets the activation the linear reads, which has no weights",
     "write the weight spec in a rule without `.input`, e.g. `type:Linear -> w8`"),
    ("*.input -> w8a8", 12, "weight options on `*.input`: a `.input` rule sets the activation "
     "the linear reads, which has no weights",
     "write the weight spec in a rule without `.input`, e.g. `type:Linear -> w8`"),
    # settings
    ("set calib.sample = 3", 5, "unknown setting `calib.sample`", "did you mean `calib.samples`?"),
    ('set calib.samples = "x"', 21, '`calib.samples` must be an integer, got `"x"`', None),
    ("set calib.samples = 1.5", 21, "`calib.samples` must be an integer, got `1.5`", None),
    ("set calib.samples = 0", 21, "`calib.samples` must be >= 1, got 0", None),
    ("set lower = int4", 13, "`lower` must be one of fake, int8, got `int4`",
     "did you mean `int8`?"),
    ("set lower.compute = fp16", 21, "`lower.compute` must be one of bf16, fp32, got `fp16`",
     "did you mean `bf16`?"),
    ("set calib.data = foo", 18, "`calib.data` must be a quoted string, got `foo`",
     'write set calib.data = "foo"'),
    ("set = 3", 5, "expected a setting name after `set`, found `=`",
     "e.g. set calib.samples = 128"),
]


@pytest.mark.parametrize("text, col, message, hint", CASES, ids=[c[0] for c in CASES])
def test_error(text, col, message, hint):
    d = one(text)
    assert (d.file, d.line, d.col, d.message, d.hint) == ("t.qrec", 1, col, message, hint)
    assert d.severity == "error" and d.source_line == text


def test_format_has_location_line_caret_and_hint():
    d = one("* -> w8 per_chanel")
    assert d.format() == ("t.qrec:1:9: error: unknown option `per_chanel`\n"
                          "    * -> w8 per_chanel\n"
                          "            ^\n"
                          "  hint: did you mean `per_channel`?")


def test_all_errors_in_a_file_are_reported_in_line_order():
    text = "* -> w0\nok -> w8\n* w8\nset nope = 1\n* -> a8 sym asym w99\n"
    got = [(d.line, d.col) for d in errors(text)]
    assert got == [(1, 6), (3, 3), (4, 5), (5, 13), (5, 18)]


def test_missing_include(tmp_path):
    (tmp_path / "a.qrec").write_text('* -> w8\n  include "nope.qrec"\n')
    (d,) = check_file(tmp_path / "a.qrec")
    assert (d.line, d.col, d.message) == (2, 12, "included file not found: `nope.qrec`")
    assert d.hint.startswith(f"looked in {tmp_path} and in the shipped recipes")


def test_include_self_and_cycle_with_chain(tmp_path):
    (tmp_path / "self.qrec").write_text('include "self.qrec"\n')
    (d,) = check_file(tmp_path / "self.qrec")
    assert (d.line, d.col, d.message) == (1, 10, "file includes itself")
    (tmp_path / "a.qrec").write_text('include "b.qrec"\n')
    (tmp_path / "b.qrec").write_text('* -> w8\ninclude "a.qrec"\n')
    (d,) = check_file(tmp_path / "a.qrec")
    assert d.file == str(tmp_path / "b.qrec") and (d.line, d.col) == (2, 10)
    assert d.message == "include cycle: a.qrec -> b.qrec -> a.qrec"


def test_errors_in_included_file_point_into_it(tmp_path):
    (tmp_path / "base.qrec").write_text("* -> w8\n* -> w99\n")
    (tmp_path / "top.qrec").write_text('* -> a17\ninclude "base.qrec"\n')
    got = [(d.file, d.line, d.col) for d in check_file(tmp_path / "top.qrec")]
    assert got == [(str(tmp_path / "top.qrec"), 1, 6), (str(tmp_path / "base.qrec"), 2, 6)]


def test_duplicate_setting_is_a_warning(tmp_path):
    (tmp_path / "a.qrec").write_text("set calib.samples = 1\nset calib.samples = 2\n")
    (d,) = check_file(tmp_path / "a.qrec")
    assert d.severity == "warning" and (d.line, d.col) == (2, 5)
    assert d.message == "`calib.samples` is set twice in this file (line 1 and here); " \
                        "the later value wins"


def test_unreadable_file(tmp_path):
    (d,) = check_file(tmp_path / "missing.qrec")
    assert d.message == "cannot read recipe: No such file or directory"
