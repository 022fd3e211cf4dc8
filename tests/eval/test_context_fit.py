"""Default lengths fit the shipped stdlib-gpt2 (256 positions; its artifacts' graphs run
255 tokens): eval of an artifact, bench's default context and compile's default
calibration window used to crash on it (issue 13, item 3)."""

import logging

import pytest
import torch

import qdsl
from qdsl.eval import hosting as bench
from qdsl.errors import OptionError
from qdsl.eval.samples import load_bench
from qdsl.eval.run import fit_eval, run_eval
from qdsl.models.lm import HFCausalLM
from qdsl.models.zoo import load_model

GPT2 = "stdlib-gpt2"


def test_bench_default_context_fits_and_runs(caplog):
    """512 prefill tokens + 32 decoded on 256 positions was an IndexError in the child."""
    with caplog.at_level(logging.WARNING):
        cfg = bench.fit_config(GPT2, bench.BenchConfig(repeats=1, rounds=1))
    assert cfg.context == 256 - 32 - 1
    assert "--context clipped to 223 tokens (default 512): the model has 256 positions" \
        in caplog.text
    with pytest.raises(OptionError, match="--context 512 does not fit.*use 223 or less"):
        bench.fit_config(GPT2, bench.BenchConfig(context=512))
    model, _ = load_model(GPT2)
    torch.set_num_threads(1)
    out = bench.measure(HFCausalLM(model, GPT2), model.config.vocab_size, cfg)
    assert out["prefill_ms"] > 0 and out["decode_ms"] > 0


def test_eval_limit_is_the_tighter_of_artifact_cache_and_model(tmp_path, caplog):
    art = tmp_path / "a"
    art.mkdir()
    (art / "qdsl_artifact.json").write_text(
        '{"model": {"id": "stdlib-gpt2", "hash": "x"}, "mode": "generate", "max_cache_len": 256}')
    with caplog.at_level(logging.WARNING):
        assert fit_eval(str(art)) == (255, 255)
    assert "--ctx-tokens clipped to 255 tokens (default 256): the artifact's graph caches " \
           "255 tokens" in caplog.text
    assert fit_eval(GPT2) == (256, 256)
    with pytest.raises(OptionError, match="--ctx-tokens 256 does not fit.*use 255 or less"):
        fit_eval(str(art), ctx_tokens=256)


@pytest.mark.slow
def test_compile_and_eval_stdlib_gpt2_with_default_lengths(tmp_path, caplog):
    """compile --calib without --seq-len (256 > the 255 the graph runs) and eval of the
    artifact with default options (a 256-token perplexity window) both failed."""
    from qdsl.config.recipe import Settings

    recipe = "block.0.ln_1 -> a8 asym per_tensor minmax\n"
    with caplog.at_level(logging.WARNING):
        qm = qdsl.compile(GPT2, recipe, calib="stdlib", settings=Settings(calib_samples=2),
                          progress=False)
    assert qm.max_cache_len == 256
    assert "calib.seq_len (--seq-len) clipped to 255 tokens (default 256)" in caplog.text
    art = qm.save(tmp_path / "art")
    samples = load_bench("stdlib", 2, 0)
    res = run_eval(str(art), samples, bench="stdlib", max_new_tokens=8, ppl_windows=2,
                   progress=False)
    for role in ("target", "baseline"):
        assert res[role]["ctx_tokens"] == 255 and res[role]["max_positions"] == 255
        assert res[role]["ppl"] > 1
    # --no-baseline: the target alone, fitted to the same lengths, so its rows pair
    alone = run_eval(str(art), samples, bench="stdlib", max_new_tokens=8, ppl_windows=2,
                     progress=False, compare=False)
    assert alone["baseline"] is None and "delta" not in alone
    assert alone["target"]["ctx_tokens"] == 255
    assert alone["target"]["ppl_window_nll"] == res["target"]["ppl_window_nll"]
    assert [s["es"] for s in alone["target"]["samples"]] == \
        [s["es"] for s in res["target"]["samples"]]
