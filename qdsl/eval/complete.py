"""Score a ``CausalLM`` on line completion and perplexity.

Per sample the prompt is built one of three ways (``CompletionConfig.prompt``):

* ``newline``: the context as is, ending with the line break (CodeXGLUE);
* ``indent``: the context followed by the target line's indentation;
* ``heal``: the context without its trailing whitespace, so the model writes the
  line break and indentation itself. BPE tokenizers merge ``"\n" + spaces`` into
  one token, so a prompt ending in a bare ``"\n"`` (or in spaces) is a token
  sequence they never saw in training; healing avoids it. Whatever the model
  writes before its first line break is ignored.

The prompt is tokenized without special tokens and left-truncated to the last
``budget`` tokens, budget = min(ctx_tokens, max_positions - max_new_tokens).
Greedy decoding (one KV-cache ``decode`` per new token) stops at the end of the
predicted line, at an end-of-sequence token or after ``max_new_tokens``. The
prediction is the first non-blank line of the (relevant part of the) generated
text, stripped: leading blank lines are skipped (the target never is blank).

Perplexity: for the first ``ppl_windows`` samples, the window is the last
``min(ctx_tokens, max_positions)`` tokens of context + target + "\\n"; reported as
per-token perplexity (tokenizer dependent) and bits per byte (comparable across
tokenizers), with each window's mean NLL (nats per token) and token count, so that two
models' perplexities can be compared window by window (``qdsl.study.stats.ppl_ratio``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..models.lm import CausalLM
from .samples import Sample
from .metrics import bits_per_byte, edit_similarity, exact_match, mean, perplexity

log = logging.getLogger(__name__)

PROMPT_MODES = ("newline", "indent", "heal")
# The prompt mode that scored best per model (stdlib test split, docs/models.md);
# any other model gets DEFAULT_PROMPT.
DEFAULT_PROMPT = "heal"
PROMPT_BY_MODEL = {"smollm2-135m": "heal", "stdlib-gpt2": "newline",
                   "qwen2.5-coder-0.5b": "newline"}


@dataclass(frozen=True)
class CompletionConfig:
    ctx_tokens: int = 256        # prompt budget in tokens (before the model's own limit)
    max_new_tokens: int = 48
    prompt: str = DEFAULT_PROMPT  # one of PROMPT_MODES

    def __post_init__(self):
        assert self.ctx_tokens > 0 and self.max_new_tokens > 0, self
        assert self.prompt in PROMPT_MODES, self.prompt


def prompt_text(sample: Sample, mode: str) -> str:
    if mode == "indent":
        return sample.context + sample.indent
    if mode == "heal":
        return sample.context.rstrip()
    return sample.context


def _relevant(text: str, mode: str) -> str:
    """The generated text that can hold the predicted line."""
    if mode == "heal":
        return text.partition("\n")[2]
    return text


def _encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _eos_ids(tok) -> set[int]:
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    return {int(i) for i in ids}


def first_line(text: str) -> str:
    """The first non-blank line of generated text, stripped ('' if none)."""
    for line in text.split("\n"):
        if line.strip():
            return line.strip()
    return ""


def prompt_ids(tok, sample: Sample, cfg: CompletionConfig, max_positions: int | None) -> torch.Tensor:
    """[1, T] token ids of the (left-truncated) prompt."""
    budget = cfg.ctx_tokens
    if max_positions:
        budget = min(budget, max_positions - cfg.max_new_tokens)
    assert budget > 0, (cfg, max_positions)
    ids = _encode(tok, prompt_text(sample, cfg.prompt))[-budget:]
    return torch.tensor([ids], dtype=torch.long)


def complete_line(lm: CausalLM, tok, sample: Sample, cfg: CompletionConfig,
                  max_positions: int | None = None) -> str:
    """Greedy completion of the sample's target line (stripped)."""
    eos = _eos_ids(tok)

    def stop(out: list[int]) -> bool:  # end of line (after some content) or end of text
        return out[-1] in eos or "\n" in _relevant(_decode(tok, out), cfg.prompt).lstrip()

    out = lm.greedy(prompt_ids(tok, sample, cfg, max_positions), cfg.max_new_tokens, stop)
    return first_line(_relevant(_decode(tok, out), cfg.prompt))


def score_completion(lm: CausalLM, tok, samples: list[Sample], cfg: CompletionConfig,
                     max_positions: int | None = None, progress: bool = True,
                     desc: str = "complete") -> dict:
    """EM (percent), ES (0-100) and per-sample predictions."""
    rows, t0, c0 = [], time.time(), time.process_time()
    for s in tqdm(samples, desc=desc, disable=not progress, unit="sample"):
        pred = complete_line(lm, tok, s, cfg, max_positions)
        rows.append({"id": s.id, "target": s.target.strip(), "pred": pred,
                     "em": exact_match(pred, s.target), "es": edit_similarity(pred, s.target)})
    return {"n": len(rows), "em": 100 * mean(r["em"] for r in rows),
            "es": mean(r["es"] for r in rows), "seconds": round(time.time() - t0, 2),
            "cpu_seconds": round(time.process_time() - c0, 2), "samples": rows}


@torch.inference_mode()
def score_perplexity(lm: CausalLM, tok, samples: list[Sample], n_windows: int,
                     window: int = 256, max_positions: int | None = None,
                     progress: bool = True) -> dict:
    """Perplexity and bits per byte over the first n_windows samples' windows."""
    if max_positions:
        window = min(window, max_positions)
    nll, n_tok, n_bytes, t0 = 0.0, 0, 0, time.time()
    window_nll, window_tokens = [], []   # per window: mean NLL (nats / token), tokens
    for s in tqdm(samples[:n_windows], desc="perplexity", disable=not progress, unit="window"):
        ids = _encode(tok, s.context + s.target + "\n")[-window:]
        if len(ids) < 2:
            continue
        x = torch.tensor([ids], dtype=torch.long)
        logits = lm.logits(x)[0, :-1].float()          # [T-1, V]
        w = F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        nll += w
        n_tok += len(ids) - 1
        window_nll.append(w / (len(ids) - 1))
        window_tokens.append(len(ids) - 1)
        n_bytes += len(_decode(tok, ids[1:]).encode("utf-8"))
    return {"windows": min(n_windows, len(samples)), "window": window, "tokens": n_tok,
            "ppl": perplexity(nll, n_tok), "bpb": bits_per_byte(nll, n_bytes),
            "window_nll": window_nll, "window_tokens": window_tokens,
            "seconds": round(time.time() - t0, 2)}


def evaluate(lm: CausalLM, tok, samples: list[Sample], cfg: CompletionConfig, *,
             max_positions: int | None = None, ppl_windows: int = 64,
             progress: bool = True) -> dict:
    """Line completion + perplexity for one model -> a JSON-able dict."""
    out = {"model": getattr(lm, "name", "model"), "ctx_tokens": cfg.ctx_tokens,
           "max_new_tokens": cfg.max_new_tokens, "prompt": cfg.prompt,
           "max_positions": max_positions}
    comp = score_completion(lm, tok, samples, cfg, max_positions, progress,
                            desc=f"{out['model']}: complete")
    out.update({k: comp[k] for k in ("n", "em", "es")})
    out["complete_seconds"] = comp["seconds"]
    out["complete_cpu_seconds"] = comp["cpu_seconds"]   # < wall time on a shared machine
    if ppl_windows > 0:
        p = score_perplexity(lm, tok, samples, ppl_windows, cfg.ctx_tokens, max_positions, progress)
        out.update({"ppl": p["ppl"], "bpb": p["bpb"], "ppl_windows": p["windows"],
                    "ppl_tokens": p["tokens"], "ppl_seconds": p["seconds"],
                    "ppl_window_nll": p["window_nll"], "ppl_window_tokens": p["window_tokens"]})
    out["samples"] = comp["samples"]
    return out
