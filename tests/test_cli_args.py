"""Every numeric option and output path of every command is checked by argparse before
anything loads (exit 2, one line naming the option, no traceback); lengths that do not
fit the model are OptionErrors from its config, before the model is loaded."""

import logging
import time

import pytest

import qdsl.eval.hosting
import qdsl.models.zoo
from qdsl.cli import main
from qdsl.errors import OptionError
from qdsl.models.limits import Limit, fit_length

# command -> the arguments it needs besides the one under test ({tmp}: a temp dir)
BASE = {
    "explain": ["explain", "r.qrec", "--model", "m"],
    "compile": ["compile", "r.qrec", "--model", "m", "-o", "{tmp}/out"],
    "train": ["train", "r.qrec", "--model", "m", "-o", "{tmp}/out"],
    "eval": ["eval", "m"],
    "bench": ["bench", "m"],
    "sweep": ["sweep", "r.qrec", "-o", "{tmp}/out"],
    "compare": ["compare", "a.json"],
}
POSITIVE = ["-3", "0", "x", "1.5", "99999999999"]
NONNEG = ["-3", "x", "1e400", "99999999999"]
SEED = ["-1", "x", str(2**32)]
FLOAT_POS = ["-3", "0", "x", "nan", "inf", "1e400"]
FLOAT_NONNEG = ["-3", "x", "nan", "inf"]
CASES = [
    ("explain", "--block", NONNEG),
    ("compile", "--samples", POSITIVE),
    ("compile", "--seq-len", POSITIVE + ["1"]),
    ("compile", "--seed", SEED),
    ("compile", "--max-cache-len", POSITIVE + ["1"]),
    ("train", "--steps", POSITIVE),
    ("train", "--seq-len", POSITIVE),
    ("train", "--seed", SEED),
    ("train", "--lr", FLOAT_POS),
    ("train", "--warmup", FLOAT_NONNEG),
    ("train", "--ckpt-every", NONNEG),
    ("eval", "--n", POSITIVE),
    ("eval", "--seed", SEED),
    ("eval", "--ctx-tokens", POSITIVE),
    ("eval", "--max-new-tokens", POSITIVE),
    ("eval", "--ppl-windows", NONNEG),
    ("eval", "--humaneval", ["-1", "165", "x"]),
    ("eval", "--threads", ["-1", "5000", "x"]),
    ("bench", "--context", POSITIVE),
    ("bench", "--decode-tokens", POSITIVE),
    ("bench", "--repeats", POSITIVE),
    ("bench", "--threads", ["0", "-1", "5000", "x"]),
    ("bench", "--rounds", POSITIVE),
    ("bench", "--power-watts", FLOAT_POS),
    ("bench", "--price-per-kwh", FLOAT_NONNEG),
    ("sweep", "--jobs", ["0", "-1", "257", "x"]),
    ("sweep", "--n", POSITIVE),
    ("sweep", "--seed", SEED),
    ("sweep", "--ppl-windows", NONNEG),
    ("sweep", "--ctx-tokens", POSITIVE),
    ("sweep", "--calib-default", POSITIVE),
    ("sweep", "--calib-samples", POSITIVE),
    ("sweep", "--calib-seq-len", POSITIVE + ["1"]),
    ("sweep", "--layer-windows", NONNEG),
    ("sweep", "--threads", ["-1", "5000", "x"]),
    ("sweep", "--humaneval", ["-1", "165", "x"]),
    ("sweep", "--humaneval-tokens", POSITIVE),
    ("compare", "--margin-es", FLOAT_POS),
    ("compare", "--margin-em", FLOAT_POS),
    ("compare", "--margin-pass1", FLOAT_POS),
    ("compare", "--margin-ppl", FLOAT_POS),
]
PATHS = [  # (command, option, bad path; {tmp} and {file}: an existing file)
    ("explain", "--graph", "{tmp}/g.txt"),
    ("explain", "--graph", "{file}/g.svg"),
    ("explain", "--graph", "{tmp}"),
    ("compile", "-o", "{file}"),
    ("compile", "-o", "{file}/sub"),
    ("train", "-o", "{file}"),
    ("train", "-o", "{file}/sub"),
    ("eval", "--json", "{tmp}/r.txt"),
    ("eval", "--json", "{file}/r.json"),
    ("eval", "--save-bench", "{tmp}/b.json"),
    ("bench", "--json", "{tmp}/b.csv"),
    ("bench", "--plot", "{tmp}/b.jpg"),
    ("sweep", "-o", "{file}"),
    ("sweep", "--doc", "{tmp}/d.txt"),
    ("compare", "--json", "{tmp}/c.txt"),
]


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    for name in ("load_model", "resolve_model"):
        monkeypatch.setattr(qdsl.models.zoo, name, refuse)


def _fails_cleanly(argv, option, capsys):
    t = time.monotonic()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert time.monotonic() - t < 10
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"qdsl {argv[0]}: error: argument ") and option in last, err
    return last


@pytest.mark.parametrize("command,option,value",
                         [(c, o, v) for c, o, values in CASES for v in values])
def test_bad_number_is_one_line_before_any_loading(command, option, value, tmp_path,
                                                   no_loading, capsys):
    argv = [a.format(tmp=tmp_path) for a in BASE[command]] + [f"{option}={value}"]
    last = _fails_cleanly(argv, option, capsys)
    assert value[:20] in last


@pytest.mark.parametrize("command,option,path", PATHS)
def test_bad_output_path_is_one_line_before_any_loading(command, option, path, tmp_path,
                                                        no_loading, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    base = [a.format(tmp=tmp_path) for a in BASE[command]]
    if option == "-o":
        base = base[:base.index("-o")]
    _fails_cleanly(base + [option, path.format(tmp=tmp_path, file=f)], option, capsys)


def test_zero_is_explicit_where_it_means_skip_or_default(tmp_path):
    """0 is accepted only where --help says what it means."""
    from qdsl.cli.app import build_parser

    for cmd, opt in (("eval", "--ppl-windows"), ("eval", "--threads"), ("eval", "--humaneval"),
                     ("sweep", "--ppl-windows"), ("sweep", "--layer-windows"),
                     ("sweep", "--threads")):
        p = build_parser(only=cmd)
        sub = p._subparsers._group_actions[0].choices[cmd]
        action = next(a for a in sub._actions if opt in a.option_strings)
        assert "0" in action.help, (cmd, opt, action.help)
    args = build_parser(only="compile").parse_args(
        ["compile", "r.qrec", "--model", "m", "-o", str(tmp_path / "o")])
    assert args.samples is None and args.seq_len is None and args.max_cache_len is None


# ----------------------------------------------------------------- lengths vs the model

def test_fit_length_clips_a_default_with_a_note_and_refuses_a_given_value(caplog):
    lim = Limit(256, "the model has 256 positions")
    with caplog.at_level(logging.WARNING):
        assert fit_length("--context", None, 512, lim, reserve=33, reserved_for="decoding") == 223
    assert "--context clipped to 223 tokens (default 512): the model has 256 positions" \
        in caplog.text
    assert fit_length("--context", 100, 512, lim) == 100
    with pytest.raises(OptionError, match=r"--context 300 does not fit: the model has 256 "
                                          r"positions; use 256 or less"):
        fit_length("--context", 300, 512, lim)
    assert fit_length("--context", None, 512, None) == 512      # no known limit


@pytest.fixture
def no_model_load(monkeypatch):
    """Reading config.json is allowed; loading weights is not."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before its lengths were checked")

    monkeypatch.setattr(qdsl.models.zoo, "load_model", refuse)
    monkeypatch.setattr(qdsl.eval.hosting, "load_float", refuse)


@pytest.mark.parametrize("argv,message", [
    (["explain", "recipes/card.qrec", "--model", "stdlib-gpt2", "--graph", "{tmp}/g.svg",
      "--block", "99"], "--block 99: the model has 4 blocks, numbered 0 to 3"),
    (["eval", "stdlib-gpt2", "--ctx-tokens", "300"],
     "--ctx-tokens 300 does not fit: the model has 256 positions; use 256 or less"),
    (["eval", "stdlib-gpt2", "--max-new-tokens", "256"], "--max-new-tokens 256 does not fit"),
    (["bench", "stdlib-gpt2", "--context", "512"],
     "--context 512 does not fit: the model has 256 positions (33 kept for 32 decode tokens"),
    (["bench", "stdlib-gpt2", "--decode-tokens", "300"], "--decode-tokens 300 does not fit"),
    (["sweep", "recipes/card.qrec", "--model", "stdlib-gpt2", "--calib-seq-len", "300",
      "-o", "{tmp}/s"], "--calib-seq-len 300 does not fit"),
])
def test_length_that_does_not_fit_is_refused_before_loading(argv, message, tmp_path,
                                                            no_model_load, capsys):
    t = time.monotonic()
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    assert time.monotonic() - t < 15
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "g.svg").exists() and not (tmp_path / "s").exists()
