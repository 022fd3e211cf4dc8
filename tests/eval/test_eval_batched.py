"""Batched greedy completion (``qdsl eval --batch-size``): left padding, masks and
positions per row, a key/value cache; float models, fake-quant and int8 artifacts give
the completions of batch size 1."""

import logging

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tiny import CAUSAL, tiny, tiny_ids

import qdsl
from qdsl.cli import main
from qdsl.compiler.loading import batch_mixing
from qdsl.eval.complete import (CompletionConfig, batch_rows, evaluate, score_completion,
                                score_perplexity)
from qdsl.eval.samples import Sample
from qdsl.graph.capture import capture
from qdsl.models.batching import left_pad, positions
from qdsl.models.lm import HFCausalLM
from qdsl.runtime.graphlm import GraphLM, last_position_graph

CACHE = 32


def _prompts(seed=3, lengths=(5, 9, 3, 4, 12, 1)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 128, (n,), generator=g).tolist() for n in lengths]


def _stop(out):            # ends rows at different steps, so some rows stop early
    return out[-1] % 7 == 0


def _one_at_a_time(lm, prompts, n=10, stop=_stop):
    return [lm.greedy(torch.tensor([p]), n, stop) for p in prompts]


@given(st.lists(st.lists(st.integers(1, 99), min_size=1, max_size=6), min_size=1, max_size=5),
       st.integers(0, 3))
def test_left_pad_keeps_each_prompt_right_aligned(prompts, extra):
    ids, mask = left_pad(prompts, len(prompts) + extra)
    assert ids.shape == mask.shape == (len(prompts) + extra, max(map(len, prompts)))
    for r, p in enumerate(prompts + [prompts[0]] * extra):
        assert ids[r][mask[r].bool()].tolist() == p
        assert mask[r, -len(p):].all() and not mask[r, :-len(p)].any()
        assert positions(mask)[r, -len(p):].tolist() == list(range(len(p)))


def test_left_pad_refuses_empty_prompts():
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[1], []])


@pytest.mark.parametrize("family", CAUSAL)
def test_float_batch_equals_batch_1(family):
    lm = HFCausalLM(tiny(family))
    prompts = _prompts()
    ref = _one_at_a_time(lm, prompts)
    assert len({len(r) for r in ref}) > 1          # rows stop at different steps
    assert lm.greedy_batch(prompts, 10, _stop) == ref
    assert lm.greedy_batch(prompts, 10) == _one_at_a_time(lm, prompts, stop=None)
    assert lm.greedy_batch(prompts, 0) == [[] for _ in prompts]


def test_float_logits_rows_equal_logits():
    lm = HFCausalLM(tiny("llama"))
    prompts = _prompts()
    for p, got in zip(prompts, lm.logits_rows(prompts)):
        want = lm.logits(torch.tensor([p]))[0]
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", CAUSAL)
def test_graph_captured_with_a_batch_equals_float(family):
    model = tiny(family)
    ref = _one_at_a_time(HFCausalLM(model), _prompts())
    lm = GraphLM(capture(model, mode="generate", max_cache_len=CACHE, batch_size=3).gm,
                 CACHE, batch_size=3)
    prompts = _prompts()
    # 6 prompts: two full batches of 3
    assert lm.greedy_batch(prompts[:3], 10, _stop) + lm.greedy_batch(prompts[3:], 10, _stop) == ref
    assert _one_at_a_time(lm, prompts) == ref   # one sequence in a batched graph
    x = tiny_ids(model, 4, 6)                   # logits: 3 rows, then 1 + 2 fillers
    torch.testing.assert_close(lm.logits(x), HFCausalLM(model).logits(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", CAUSAL)
def test_last_position_graph_gives_the_last_logits(family):
    """Greedy's prefill reads the last position only: the copy of the graph whose head
    reads that position gives the full graph's logits there (to summation order), shares
    its tensors, and GraphLM runs it for a prefill (not for perplexity's logits)."""
    model = tiny(family)
    gm = capture(model, mode="generate", max_cache_len=CACHE, batch_size=2).gm
    last = last_position_graph(gm)
    assert last is not None
    assert {id(p) for p in last.parameters()} <= {id(p) for p in gm.parameters()}
    lm = GraphLM(gm, CACHE, batch_size=2)
    ids, mask = left_pad(_prompts()[:2], 2)
    full = lm._logits_rows(ids, mask)
    one = lm._logits_rows(ids, mask, last=True)
    assert one.shape == (2, 1, full.shape[-1])
    torch.testing.assert_close(one[:, 0], full[:, -1], atol=1e-5, rtol=1e-5)
    lm.greedy_batch(_prompts()[:2], 3)
    assert len(lm._last) == 1 and lm._last[0] is not None   # built on the first prefill


def test_last_position_graph_refuses_other_outputs():
    """An output that is not a float linear (here a linear followed by an op that could
    mix positions) gets no last-position copy: the full graph runs."""
    class Mixer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(4, 6)

        def forward(self, x):
            return self.head(x).cumsum(1)
    gm = torch.export.export(Mixer(), (torch.randn(1, 3, 4),)).module()
    assert last_position_graph(gm) is None


def test_graph_batch_limits():
    model = tiny("gpt2")
    lm = GraphLM(capture(model, mode="generate", max_cache_len=CACHE, batch_size=2).gm,
                 CACHE, batch_size=2)
    with pytest.raises(ValueError, match="exceed the model's batch of 2"):
        lm.greedy_batch(_prompts()[:3], 4)
    with pytest.raises(ValueError, match="exceeds the graph's cache"):
        lm.greedy_batch([[1] * 30], 4)
    with pytest.raises(qdsl.errors.CaptureError, match="at least 1 row"):
        capture(model, mode="generate", max_cache_len=CACHE, batch_size=0)


STATIC = """
*                    -> w8 sym per_channel
block.*.ln_1         -> a8 asym per_tensor static
block.*.attn.context -> a8 sym per_token dynamic
block.*.ln_2         -> a8 per_tensor static
"""
DYNAMIC_PER_TENSOR = STATIC + "block.0.ln_1 -> a8 asym per_tensor dynamic\n"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    model = tiny("gpt2")
    d = tmp_path_factory.mktemp("batched")
    calib = tiny_ids(model, 2, 8)
    out = {}
    for name, recipe, lower in (("fake", STATIC, None), ("int8", STATIC, "int8"),
                                ("dyn", DYNAMIC_PER_TENSOR, None)):
        out[name] = qdsl.compile(model, recipe, calib=calib, lower=lower, max_cache_len=CACHE,
                                 progress=False).save(d / name)
    return model, out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fake", "int8"])
def test_artifact_batch_equals_batch_1(artifacts, kind):
    model, paths = artifacts
    src = model if kind == "fake" else None
    one = qdsl.load(paths[kind], src).lm()
    many = qdsl.load(paths[kind], src, batch_size=4).lm()
    assert one.batch_size == 1 and many.batch_size == 4
    prompts = _prompts()     # a 4-token prompt: 4 rows in Int8WeightOnlyLinear (aligned load)
    ref = _one_at_a_time(one, prompts)
    # 6 prompts: a full batch of 4, then 2 with filler rows
    assert many.greedy_batch(prompts[:4], 10, _stop) + many.greedy_batch(prompts[4:], 10, _stop) \
        == ref


def test_dynamic_per_tensor_artifact_runs_batch_1(artifacts, caplog):
    model, paths = artifacts
    assert batch_mixing(qdsl.load(paths["fake"], model).plan) is None
    with caplog.at_level(logging.WARNING, logger="qdsl.compiler.loading"):
        lm = qdsl.load(paths["dyn"], model, batch_size=4).lm()
    assert lm.batch_size == 1
    assert "batch size 1, not 4" in caplog.text and "block.0.ln_1" in caplog.text
    assert "dynamically per_tensor" in caplog.text


class CharTok:
    """Characters as ids (ASCII < the tiny vocab of 128); id 0 ends the text."""
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 128 for c in text]}

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return "".join(chr(i) for i in ids if i)


def _samples(n=7):
    lines = ["def f(x):", "    y = x + 1", "    return y", "", "class A:", "    pass",
             "import os", "print(os.sep)"]
    return [Sample(f"s{i}", "s.py", i, "\n".join(lines[:i % 6 + 2]) + "\n", "    z = 2")
            for i in range(n)]


@pytest.mark.parametrize("prompt", ["heal", "newline"])
def test_score_completion_batched_equals_one_at_a_time(prompt):
    lm, tok, samples = HFCausalLM(tiny("llama")), CharTok(), _samples()
    cfg = CompletionConfig(ctx_tokens=40, max_new_tokens=8, prompt=prompt)
    one = score_completion(lm, tok, samples, cfg, progress=False)
    many = score_completion(lm, tok, samples, cfg, progress=False, batch_size=3)
    assert [r["id"] for r in many["samples"]] == [s.id for s in samples]   # input order
    assert many["samples"] == one["samples"]


def test_perplexity_batched_equals_one_at_a_time():
    lm, tok, samples = HFCausalLM(tiny("llama")), CharTok(), _samples()
    one = score_perplexity(lm, tok, samples, 5, window=40, progress=False)
    many = score_perplexity(lm, tok, samples, 5, window=40, progress=False, batch_size=4)
    assert many["tokens"] == one["tokens"] and many["windows"] == one["windows"] == 5
    assert many["ppl"] == pytest.approx(one["ppl"], rel=1e-5)


def test_evaluate_records_the_rows_it_ran(artifacts):
    model, paths = artifacts
    cfg = CompletionConfig(ctx_tokens=16, max_new_tokens=4)
    graph = qdsl.load(paths["fake"], model, batch_size=2).lm()
    res = evaluate(graph, CharTok(), _samples(3), cfg, ppl_windows=3, progress=False,
                   batch_size=8)
    assert res["batch_size"] == 2          # capped at the graph's rows
    assert res["execution"]["runner"] == "graph" and res["execution"]["batch_size"] == 2
    assert res["execution"]["cpu"] == torch.backends.cpu.get_cpu_capability()
    ref = evaluate(qdsl.load(paths["fake"], model).lm(), CharTok(), _samples(3), cfg,
                   ppl_windows=3, progress=False)
    assert res["samples"] == ref["samples"] and res["ppl"] == pytest.approx(ref["ppl"], rel=1e-5)


def test_batch_rows():
    class OneAtATime:       # a CausalLM without greedy_batch
        pass
    assert batch_rows(OneAtATime(), 8) == 1
    assert batch_rows(HFCausalLM(tiny("gpt2")), 8) == 8
    with pytest.raises(ValueError):
        batch_rows(HFCausalLM(tiny("gpt2")), 0)


def test_cli_batch_size_option(capsys, artifacts):
    from qdsl.eval.run import DEFAULT_BATCH_SIZE, default_batch_size
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert f"(default {DEFAULT_BATCH_SIZE}, for a model and an artifact alike" \
        in " ".join(capsys.readouterr().out.split())
    assert default_batch_size(str(artifacts[1]["fake"])) == DEFAULT_BATCH_SIZE
    assert default_batch_size(str(artifacts[1]["int8"])) == DEFAULT_BATCH_SIZE
    assert default_batch_size(str(artifacts[1]["dyn"])) == 1     # a dynamic per-tensor input
    assert default_batch_size("stdlib-gpt2") == DEFAULT_BATCH_SIZE
    with pytest.raises(SystemExit) as e:
        main(["eval", "x", "--batch-size", "0"])
    assert e.value.code == 2
    assert "--batch-size: must be an integer from 1 to 256, got 0" in capsys.readouterr().err
