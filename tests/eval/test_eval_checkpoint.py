"""Completion checkpoints (``qdsl.eval.checkpoint``): an interrupted evaluation resumes
with the completions it had, computes only the batches it had not, and gives what an
uninterrupted run gives; a checkpoint of another run is not used."""

import json
import logging

import pytest
from test_eval_batched import CharTok, _samples
from tiny import tiny

from qdsl.eval.checkpoint import FORMAT, CompletionCheckpoint
from qdsl.eval.complete import CompletionConfig, evaluate, score_completion, score_perplexity
from qdsl.models.lm import HFCausalLM

CFG = CompletionConfig(ctx_tokens=40, max_new_tokens=6, prompt="heal")


class Counting:
    """A CausalLM whose batched calls are counted, and which fails at call ``fail_at``."""

    def __init__(self, lm, fail_at=None):
        self.lm, self.calls, self.fail_at = lm, 0, fail_at
        self.batch_size = None

    def greedy_batch(self, prompts, n, stop):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return self.lm.greedy_batch(prompts, n, stop)

    def __getattr__(self, name):
        return getattr(self.lm, name)


@pytest.fixture(scope="module")
def lm():
    return HFCausalLM(tiny("llama"))


def _ck(path, **header):
    return CompletionCheckpoint(path, {"run": 1, **header}, every=0.0)


def test_interrupted_run_resumes_with_what_it_had(lm, tmp_path):
    samples, path = _samples(7), tmp_path / "ck.json"
    ref = score_completion(lm, CharTok(), samples, CFG, progress=False, batch_size=2)
    first = Counting(lm, fail_at=3)        # batches of 2: 7 samples are 4 batches
    with pytest.raises(KeyboardInterrupt):
        score_completion(first, CharTok(), samples, CFG, progress=False, batch_size=2,
                         checkpoint=_ck(path))
    saved = json.loads(path.read_text())
    assert saved["format"] == FORMAT and saved["n_done"] == 4 and saved["seconds"] > 0
    again = Counting(lm)
    res = score_completion(again, CharTok(), samples, CFG, progress=False, batch_size=2,
                           checkpoint=_ck(path))
    assert again.calls == 2                # the two batches the first run did not finish
    assert res["resumed"] == 4 and res["samples"] == ref["samples"]
    assert res["seconds"] >= saved["seconds"]          # the earlier run's time counts
    assert json.loads(path.read_text())["n_done"] == 7


def test_checkpoint_of_another_run_is_not_used(lm, tmp_path, caplog):
    samples, path = _samples(4), tmp_path / "ck.json"
    score_completion(lm, CharTok(), samples, CFG, progress=False, batch_size=2,
                     checkpoint=_ck(path, params="a"))
    other = Counting(lm)
    with caplog.at_level(logging.WARNING):
        res = score_completion(other, CharTok(), samples, CFG, progress=False, batch_size=2,
                               checkpoint=_ck(path, params="b"))
    assert other.calls == 2 and res["resumed"] == 0
    assert "of another run (params differ)" in caplog.text


@pytest.mark.parametrize("text", ["{", "[]", json.dumps({"format": FORMAT, "header": {"run": 1},
                                                         "preds": {"s0": 3}})])
def test_damaged_checkpoint_starts_over(lm, tmp_path, caplog, text):
    path = tmp_path / "ck.json"
    path.write_text(text)
    counted = Counting(lm)
    with caplog.at_level(logging.WARNING):
        res = score_completion(counted, CharTok(), _samples(4), CFG, progress=False,
                               batch_size=2, checkpoint=_ck(path))
    assert counted.calls == 2 and res["resumed"] == 0
    assert f"completion checkpoint {path} is unusable" in caplog.text


def test_a_batch_is_skipped_only_whole(lm, tmp_path):
    samples, path = _samples(4), tmp_path / "ck.json"
    ref = score_completion(lm, CharTok(), samples, CFG, progress=False, batch_size=2)
    first = ref["samples"][0]["id"]      # one sample of a batch saved: the batch runs again
    ck = _ck(path)
    ck.save({first: ref["samples"][0]["pred"]}, 1.0, 1.0, force=True)
    counted = Counting(lm)
    res = score_completion(counted, CharTok(), samples, CFG, progress=False, batch_size=2,
                           checkpoint=_ck(path))
    assert counted.calls == 2 and res["samples"] == ref["samples"] and res["resumed"] == 0


class CountingRows(Counting):
    """Counts perplexity's batched forwards (not the completions') and fails at call
    ``fail_at``."""

    def greedy_batch(self, prompts, n, stop):
        return self.lm.greedy_batch(prompts, n, stop)

    def logits_rows(self, windows):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return self.lm.logits_rows(windows)


def test_interrupted_perplexity_resumes_beside_the_completions(lm, tmp_path):
    samples, path = _samples(7), tmp_path / "ck.json"
    ref = evaluate(lm, CharTok(), samples, CFG, ppl_windows=7, progress=False, batch_size=2)
    first = CountingRows(lm, fail_at=3)      # 7 windows in chunks of 2: 4 forwards
    with pytest.raises(KeyboardInterrupt):
        evaluate(first, CharTok(), samples, CFG, ppl_windows=7, progress=False,
                 batch_size=2, checkpoint=_ck(path))
    saved = json.loads(path.read_text())
    assert saved["n_done"] == 7 and len(saved["ppl"]["windows"]) == 4   # two chunks saved
    again = CountingRows(lm)
    res = evaluate(again, CharTok(), samples, CFG, ppl_windows=7, progress=False,
                   batch_size=2, checkpoint=_ck(path))
    assert again.calls == 2                  # perplexity's two unfinished chunks only
    assert res["resumed"] == 7 and res["ppl_resumed"] == 4
    for k in ("ppl", "bpb", "ppl_window_nll", "ppl_window_tokens", "ppl_tokens"):
        assert res[k] == ref[k], k           # the same numbers, bit for bit
    assert res["ppl_seconds"] >= saved["ppl"]["seconds"]
    assert res["samples"] == ref["samples"]


def test_perplexity_of_another_run_is_not_used(lm, tmp_path):
    samples, path = _samples(4), tmp_path / "ck.json"
    evaluate(lm, CharTok(), samples, CFG, ppl_windows=4, progress=False, batch_size=2,
             checkpoint=_ck(path, params="a"))
    other = CountingRows(lm)
    res = evaluate(other, CharTok(), samples, CFG, ppl_windows=4, progress=False,
                   batch_size=2, checkpoint=_ck(path, params="b"))
    assert other.calls == 2 and "ppl_resumed" not in res


def test_perplexity_alone_keeps_the_saved_completions(lm, tmp_path):
    samples, path = _samples(4), tmp_path / "ck.json"
    score_completion(lm, CharTok(), samples, CFG, progress=False, batch_size=2,
                     checkpoint=_ck(path))
    score_perplexity(lm, CharTok(), samples, 4, window=40, progress=False, batch_size=2,
                     checkpoint=_ck(path))
    saved = json.loads(path.read_text())
    assert saved["n_done"] == 4 and len(saved["ppl"]["windows"]) == 4


def test_damaged_perplexity_windows_start_over(lm, tmp_path, caplog):
    path = tmp_path / "ck.json"
    path.write_text(json.dumps({"format": FORMAT, "header": {"run": 1}, "preds": {},
                                "ppl": {"windows": {"0": [1.0, 2]}}}))
    counted = CountingRows(lm)
    with caplog.at_level(logging.WARNING):
        res = score_perplexity(counted, CharTok(), _samples(4), 4, window=40, progress=False,
                               batch_size=2, checkpoint=_ck(path))
    assert counted.calls == 2 and res["resumed"] == 0
    assert "is unusable (ppl is not a map" in caplog.text
