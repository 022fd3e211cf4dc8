"""The found recipe's measured loss: compiled, then scored as ``qdsl eval`` scores.

The recipe is compiled as ``qdsl compile`` would (``compiler.build.compile``, fake
lowering, generate graph) on the search's own calibration windows, and its perplexity
windows are scored by ``eval.complete.score_perplexity``, the function ``qdsl eval``'s
perplexity runs, on the benchmark ``qdsl eval --bench B --n N --seed S`` draws, with
the context it would use (256 tokens, clipped to the graph's cache and the model's
positions) and one window per forward (an artifact's default). So
``qdsl eval ART --bench B --n N --seed S --ppl-windows N`` on the artifact of
``qdsl compile found.qrec --model M --calib C --samples K --seq-len L --seed S0``
reports the perplexity whose log this is (tests/search/test_search_measure.py). The
float model is scored on the same windows, one per forward.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..compiler.build import compile as compile_recipe
from ..eval.complete import score_perplexity
from ..eval.run import DEFAULT_CTX_TOKENS
from ..eval.samples import load_bench
from ..graph.capture import max_positions
from ..lang.loader import parse_recipe
from ..models.limits import DEFAULT_MAX_CACHE_LEN, Limit, fit_length, positions_of_config
from ..models.lm import HFCausalLM


@dataclass
class Measured:
    """Mean next-token loss (nats per token, ``log`` of ``qdsl eval``'s perplexity) of
    the found recipe and of the float model on ``windows`` windows of ``bench``."""

    loss: float
    float_loss: float
    windows: int
    tokens: int
    window: int
    bench: str
    n: int
    seed: int
    window_nll: list[float]
    float_window_nll: list[float]
    seconds: float

    def to_json(self) -> dict:
        return {"loss": self.loss, "float_loss": self.float_loss, "windows": self.windows,
                "tokens": self.tokens, "window": self.window, "bench": self.bench,
                "n": self.n, "seed": self.seed, "ppl": math.exp(self.loss),
                "float_ppl": math.exp(self.float_loss), "window_nll": self.window_nll,
                "float_window_nll": self.float_window_nll, "seconds": self.seconds}

    def line(self) -> str:
        return (f"Measured: {self.loss:.4f} nats/token (float {self.float_loss:.4f}; "
                f"perplexity {math.exp(self.loss):.3f} vs {math.exp(self.float_loss):.3f}) "
                f"on {self.windows} held-out windows of {self.window} tokens "
                f"(`qdsl eval --bench {self.bench} --n {self.n} --seed {self.seed} "
                f"--ppl-windows {self.windows}` of the recipe compiled on the search's "
                f"calibration windows, fake lowering).")


def held_out(bench: str = "stdlib", n: int = 16, seed: int = 0) -> list:
    """The samples ``qdsl eval --bench bench --n n --seed seed`` draws (a bad bench is a
    ``BenchError``: the search asks for them before any model work)."""
    return load_bench(bench, n, seed)


def measure(model: torch.nn.Module, tok, recipe_text: str, windows: torch.Tensor, *,
            bench: str = "stdlib", n: int = 16, seed: int = 0, samples: list | None = None,
            progress: bool = True) -> Measured:
    """Compile ``recipe_text`` for ``model`` on the calibration ``windows`` and score it
    and the float model on the first ``n`` samples of ``bench`` (drawn with ``seed``;
    ``samples``: those, already drawn by ``held_out``)."""
    t0 = time.perf_counter()
    samples = held_out(bench, n, seed) if samples is None else samples
    positions = positions_of_config(getattr(model, "config", None) or {}) or max_positions(model)
    cache = min(DEFAULT_MAX_CACHE_LEN, positions)   # what `qdsl compile` picks
    limit = Limit(min(cache - 1, positions), f"the compiled graph caches {cache - 1} tokens")
    ctx = fit_length("--ctx-tokens", None, DEFAULT_CTX_TOKENS, limit)
    base = score_perplexity(HFCausalLM(model, "float"), tok, samples, n, ctx, limit.tokens,
                            progress=progress, batch_size=1)
    q = compile_recipe(model, parse_recipe(recipe_text, "<found>"), calib=windows,
                       tokenizer=tok, lower="fake", max_cache_len=cache, progress=False)
    got = score_perplexity(q.lm(name="found"), tok, samples, n, ctx, limit.tokens,
                           progress=progress, batch_size=1)
    return Measured(math.log(got["ppl"]), math.log(base["ppl"]), len(got["window_nll"]),
                    got["tokens"], ctx, bench, n, seed, got["window_nll"], base["window_nll"],
                    time.perf_counter() - t0)
