"""``qdsl search --transforms``: options parsed with located errors, each option searched
on its own transformed graph (float-equivalent), the lowest measured loss written with its
statements first; a structure that does not fit is a located error before any data."""

from __future__ import annotations

import json

import pytest
import torch

from qdsl import cli
from qdsl.errors import GraphError, RecipeError
from qdsl.graph.capture import capture
from qdsl.graph.naming import name_graph
from qdsl.lang.formatter import format_text
from qdsl.lang.loader import parse_recipe
from qdsl.plan import build_plan
from qdsl.search.candidates import parse_candidates
from qdsl.search.transforms import NONE, apply, parse_transforms
from qdsl.search.units import build_space
from tests.tiny import tiny, tiny_ids


def test_options_parse_and_label():
    opts = parse_transforms(" none ;rotate")
    assert [o.label for o in opts] == ["none", "rotate"] and opts[0] is NONE
    assert opts[1].statements == ("rotate",) and opts[1].recipe_text == "rotate\n"


@pytest.mark.parametrize("text, col, words", [
    ("none; smooth block.*.mlp.up", 7, "`smooth` is not searched"),
    ("none; none", 7, "repeats an earlier option"),
    ("none; w8", 9, "expected `->`"),
    ("none; *  -> w8", 7, "is not a transform statement"),
    ("none; rotate, rotat", 20, "expected `->`"),   # after the second statement
    ("none;; rotate", 6, "empty transform option"),
    ("none; rotat", 12, "expected `->`"),
])
def test_a_bad_option_is_located_in_the_option_text(text, col, words):
    with pytest.raises(RecipeError) as e:
        parse_transforms(text)
    d = e.value.diagnostics[0]
    assert d.file == "--transforms" and d.line == 1 and d.col == col, d
    assert words in d.message, d.message


def _loss(gm, ids):
    logits = gm(ids)
    logits = logits[0] if isinstance(logits, (tuple, list)) else logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                             ids[:, 1:].flatten()).item()


def test_rotate_option_is_float_equivalent_and_keeps_the_units():
    model = tiny("llama")
    ids = tiny_ids(model, batch=2, seq=16)
    cands = parse_candidates("w8a8; w8a16")
    spaces, losses = [], []
    for opt in parse_transforms("none; rotate"):
        cap = capture(model, mode="plain")
        named = apply(opt, cap.gm, name_graph(cap))
        spaces.append(build_space(cap.gm, named, cands))
        losses.append(_loss(cap.gm, ids))
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    assert [u.key for u in spaces[1].units] == [u.key for u in spaces[0].units]
    assert [[c.bytes for c in u.choices] for u in spaces[1].units] == \
        [[c.bytes for c in u.choices] for u in spaces[0].units]


def test_rotate_unties_a_tied_lm_head_and_prices_only_what_the_graph_reads():
    """SmolLM2 ties lm_head to the float embedding: in ``none`` a float lm_head reads the
    embedding's table for nothing; rotate gives lm_head its own rotated copy, which costs
    its bytes even in float (quantized, lm_head is a copy of its own either way). The
    tied tensor rotate replaced, left on the module and read by no node, is not counted
    (it was: 113 MB too many on SmolLM2)."""
    model = tiny("llama", tie_word_embeddings=True)
    cands = parse_candidates("w8a8; w4a8; skip")
    spaces = []
    for opt in parse_transforms("none; rotate"):
        cap = capture(model, mode="plain")
        named = apply(opt, cap.gm, name_graph(cap))
        spaces.append(build_space(cap.gm, named, cands))
    none, rot = spaces
    lm = [i for i, u in enumerate(rot.units) if "lm_head" in u.linears]
    assert len(lm) == 1
    vocab, hidden = model.lm_head.weight.shape
    n_bytes, r_bytes = ([c.bytes for c in sp.units[lm[0]].choices] for sp in spaces)
    assert n_bytes[:2] == r_bytes[:2] and n_bytes[0] >= vocab * hidden   # 8-bit codes
    assert n_bytes[2] == 0.0 and r_bytes[2] == vocab * hidden * 4        # float: free / own
    # the embedding once, not the unrotated table too (rotate also drops a few unread
    # bytes: the dead rotary buffer export leaves)
    assert none.fixed_bytes - 64 <= rot.fixed_bytes <= none.fixed_bytes
    others = [i for i in range(len(rot.units)) if i != lm[0]]
    assert [rot.units[i].choices for i in others] == [none.units[i].choices for i in others]


def test_an_option_over_the_budget_is_named_before_any_data(llama_dir, capsys, monkeypatch,
                                                            tmp_path):
    """Budgets are checked per option: on a tied model a float lm_head is free in `none`
    and a copy of its own in `rotate`, so a size between the two options' least
    allocations fits `none` and not `rotate`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from qdsl.search import run as run_mod
    from qdsl.search.run import least_bytes

    src = AutoModelForCausalLM.from_pretrained(llama_dir / "model")
    cfg = src.config
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    model = type(src)(cfg)
    model.save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(llama_dir / "model").save_pretrained(tmp_path / "model")
    cands = parse_candidates("w8, a8 sym; w8a16; skip")   # none's least: lm_head float, free
    least = []
    for opt in parse_transforms("none; rotate"):
        cap = capture(model, mode="plain")
        least.append(least_bytes(build_space(cap.gm, apply(opt, cap.gm, name_graph(cap)),
                                             cands)))
    assert least[1] > least[0]
    monkeypatch.setattr(run_mod, "calibration_windows",
                        lambda *a, **k: pytest.fail("data read before the budget check"))
    out = tmp_path / "over.qrec"
    args = _args(llama_dir, out, "--transforms", "none; rotate")
    args[args.index("--model") + 1] = str(tmp_path / "model")
    args[args.index("--candidates") + 1] = "w8, a8 sym; w8a16; skip"
    args[args.index("--budget"):args.index("--budget") + 2] = [
        "--size", f"{(least[0] + least[1]) / 2e6:.6f}"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "--transforms option `rotate`: the size budget cannot be met" in err, err
    assert not out.exists()


def test_rotate_on_gpt2_names_the_node_before_any_data():
    model = tiny("gpt2")
    cap = capture(model, mode="plain")
    with pytest.raises(GraphError) as e:
        apply(parse_transforms("rotate")[0], cap.gm, name_graph(cap))
    assert "rotate (--transforms:1:1)" in str(e.value)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A saved tiny LLaMA (RMSNorms, so rotate fits) with the tiny GPT-2's tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tests.search.conftest import CODE

    root = tmp_path_factory.mktemp("search_llama")
    code = root / "code"
    code.mkdir()
    for i in range(4):
        (code / f"m{i}.py").write_text(CODE * (i + 2))
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([CODE] * 10, vocab_size=300, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=64, bos_token_id=tok.eos_token_id,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():   # an outlier channel in the residual stream
        model.model.embed_tokens.weight[:, 3] *= 50.0
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root


def _args(root, out, *extra):
    return ["search", "--model", str(root / "model"), "--budget", "10",
            "--candidates", "w8, a8 sym; w8a16", "--act-bits", "9", "--calib",
            str(root / "code"), "--samples", "12", "--seq-len", "16", "--batch", "4",
            "--check", "3", "--check-windows", "4", "--measure-bench", str(root / "code"),
            "--measure-windows", "3", "-o", str(out), "--report", str(out) + ".json", *extra]


@pytest.mark.slow
def test_the_lowest_measured_option_is_written_with_its_statements(llama_dir, capsys):
    out = llama_dir / "found.qrec"
    assert cli.main(_args(llama_dir, out, "--transforms", "none; rotate")) == 0
    text = out.read_text()
    rep = json.loads((llama_dir / "found.qrec.json").read_text())["transforms"]
    opts = {o["option"]: o for o in rep["options"]}
    assert set(opts) == {"none", "rotate"}
    assert rep["chosen"] == min(opts, key=lambda k: opts[k]["measured"])
    # rotation is free in storage on an untied model (rotate drops an unread rotary buffer)
    assert opts["rotate"]["bytes"] == pytest.approx(opts["none"]["bytes"], abs=64)
    assert "# Transforms searched: `none` predicted" in text
    body = [x for x in text.splitlines() if x and not x.startswith("#")]
    assert (body[0] == "rotate") == (rep["chosen"] == "rotate")
    assert format_text(text) == text
    recipe = parse_recipe(text)
    model = __import__("transformers").AutoModelForCausalLM.from_pretrained(llama_dir / "model")
    plan = build_plan(recipe, name_graph(capture(model, mode="plain")))
    assert [t.kind for t in plan.transforms] == (["rotate"] if rep["chosen"] == "rotate" else [])
    assert not list(llama_dir.glob("found.qrec*.partial.*"))   # every option's state removed
    # the default (no --transforms) writes no Transforms line and no per-option report
    plain = llama_dir / "plain.qrec"
    assert cli.main(_args(llama_dir, plain)) == 0
    assert "Transforms" not in plain.read_text()
    assert "transforms" not in json.loads((llama_dir / "plain.qrec.json").read_text())


def test_cli_rotate_on_a_model_without_rmsnorm_is_one_located_error(capsys, tmp_path,
                                                                    monkeypatch):
    from qdsl.models import zoo
    monkeypatch.setattr(zoo, "load_model", lambda name, **kw: (tiny("gpt2"), None))
    code = cli.main(["search", "--model", "tiny", "--budget", "8", "--candidates", "w8a8",
                     "--seq-len", "32", "--transforms", "none; rotate",
                     "-o", str(tmp_path / "f.qrec")])
    err = capsys.readouterr().err
    assert code != 0 and "rotate (--transforms:1:7)" in err and "RMSNorm" in err and "Traceback" not in err
    assert not (tmp_path / "f.qrec").exists()


def test_cli_bad_option_is_a_located_error_before_the_model(capsys, tmp_path):
    code = cli.main(["search", "--model", "nope", "--budget", "4", "--candidates", "w8a8",
                     "--transforms", "none; smooth block.*.mlp.up", "-o", str(tmp_path / "f.qrec")])
    err = capsys.readouterr().err
    assert code != 0 and "--transforms:1:7: error: `smooth` is not searched" in err
    assert "Traceback" not in err
