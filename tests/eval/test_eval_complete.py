import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from qdsl.eval.samples import Sample
from qdsl.eval.complete import (CompletionConfig, complete_line, evaluate, first_line,
                                prompt_ids, prompt_text)
from qdsl.models.lm import HFCausalLM


class CharTok:
    """A character-level tokenizer: id = ord(c); id 0 is end of text."""
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return "".join(chr(i) for i in ids if i)


class ScriptLM:
    """Greedy 'generates' a fixed text, honouring stop and max_new_tokens."""
    name = "script"

    def __init__(self, text):
        self.text, self.prompts = text, []

    def greedy(self, ids, max_new_tokens, stop=None):
        self.prompts.append(ids)
        out = []
        for c in self.text:
            out.append(ord(c))
            if len(out) >= max_new_tokens or (stop and stop(out)):
                break
        return out

    def logits(self, ids):
        return torch.zeros(1, ids.shape[1], 256)


S = Sample("f.py:3", "f.py", 3, "def f(x):\n    y = x\n", "    return y")


def test_prompt_modes():
    assert prompt_text(S, "newline") == S.context
    assert prompt_text(S, "indent") == S.context + "    "
    assert prompt_text(S, "heal") == "def f(x):\n    y = x"


def test_prompt_left_truncated_to_budget():
    tok = CharTok()
    ids = prompt_ids(tok, S, CompletionConfig(ctx_tokens=5, prompt="newline"), None)
    assert ids.tolist() == [[ord(c) for c in " = x\n"]]
    ids = prompt_ids(tok, S, CompletionConfig(ctx_tokens=100, max_new_tokens=4, prompt="heal"), 8)
    assert ids.shape == (1, 4)                               # 8 positions - 4 new tokens


def test_heal_drops_the_rest_of_the_previous_line_and_stops_at_end_of_line():
    lm = ScriptLM("  # c\n    return y\n    z = 1\n")
    assert complete_line(lm, CharTok(), S, CompletionConfig(prompt="heal")) == "return y"
    lm = ScriptLM("\n\n    return  y\nmore")
    assert complete_line(lm, CharTok(), S, CompletionConfig(prompt="newline")) == "return  y"
    lm = ScriptLM("return y" + "\0" + "junk")                 # end of text stops it
    assert complete_line(lm, CharTok(), S, CompletionConfig(prompt="indent")) == "return y"
    lm = ScriptLM("x" * 100)
    assert complete_line(lm, CharTok(), S, CompletionConfig(max_new_tokens=7, prompt="newline")) == "x" * 7


def test_first_line():
    assert first_line("\n  \n  a b \nc") == "a b" and first_line("\n\n") == ""


def test_evaluate_reports_em_es():
    res = evaluate(ScriptLM("\n    return y\n"), CharTok(), [S, S], CompletionConfig(prompt="heal"),
                   ppl_windows=1, progress=False)
    assert res["em"] == 100.0 and res["es"] == 100.0 and res["n"] == 2
    assert abs(res["ppl"] - 256.0) < 1e-3                       # uniform logits over 256 ids


def test_perplexity_records_each_windows_mean_loss():
    """Per window: mean NLL (nats per token) and tokens, for paired comparisons."""
    import math

    from qdsl.eval.complete import score_perplexity
    short = Sample("g.py:1", "g.py", 1, "x\n", "y")
    res = score_perplexity(ScriptLM(""), CharTok(), [S, short], 2, progress=False)
    n_tok = len(S.context + S.target + "\n") - 1
    assert res["window_tokens"] == [n_tok, len("x\ny\n") - 1]
    assert res["window_nll"] == [pytest.approx(math.log(256))] * 2  # uniform over 256 ids
    total = sum(w * t for w, t in zip(res["window_nll"], res["window_tokens"]))
    assert res["ppl"] == pytest.approx(math.exp(total / res["tokens"]))
    res = evaluate(ScriptLM("\n    return y\n"), CharTok(), [S, S], CompletionConfig(),
                   ppl_windows=2, progress=False)
    assert len(res["ppl_window_nll"]) == 2 == len(res["ppl_window_tokens"])


def test_perplexity_windows_need_not_be_completion_samples():
    """`ppl_samples`: more windows than completions (SmolLM2 at n = 100 with 256 windows):
    completion scores the samples, perplexity the first ppl_windows of the pool."""
    short = Sample("g.py:1", "g.py", 1, "x\n", "y")
    res = evaluate(ScriptLM("\n    return y\n"), CharTok(), [S], CompletionConfig(prompt="heal"),
                   ppl_windows=3, progress=False, ppl_samples=[S, short, short, S])
    assert res["n"] == 1 and len(res["samples"]) == 1
    assert res["ppl_windows"] == 3 and len(res["ppl_window_tokens"]) == 3
    assert res["ppl_window_tokens"][1] == len("x\ny\n") - 1


def test_eval_cli_draws_the_bench_to_the_window_count():
    """The stdlib bench is prefix-stable by seed, so the first --n of a longer draw are
    the --n samples themselves."""
    from qdsl.eval.samples import load_bench
    assert load_bench("stdlib", 30, 0) == load_bench("stdlib", 70, 0)[:30]


def _tiny_gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    return GPT2LMHeadModel(cfg).eval()


def test_greedy_with_kv_cache_equals_greedy_without():
    lm = HFCausalLM(_tiny_gpt2(), "tiny")
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 97, (1, 7), generator=g)
        cached = lm.greedy(ids, 20)
        seq = ids.clone()
        plain = []
        for _ in range(20):                                     # full forward each step
            tok = int(lm.logits(seq)[0, -1].argmax())
            plain.append(tok)
            seq = torch.cat([seq, torch.tensor([[tok]])], dim=1)
        assert cached == plain


def test_greedy_stop_function_and_budget():
    lm = HFCausalLM(_tiny_gpt2(), "tiny")
    ids = torch.tensor([[1, 2, 3]])
    assert len(lm.greedy(ids, 5)) == 5
    assert len(lm.greedy(ids, 10, stop=lambda out: len(out) == 3)) == 3
    assert lm.greedy(ids, 0) == []
