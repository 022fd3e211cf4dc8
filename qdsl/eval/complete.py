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

Batches (``batch_size`` > 1, ``qdsl eval --batch-size``): several samples per
forward through the model's ``greedy_batch`` (``qdsl.models.batching``: left-padded,
a mask and positions per row, a key/value cache; each row stops on its own), the
longest prompts together; perplexity windows likewise through ``logits_rows``. A
model without them (or a graph loaded with batch 1) runs one sample at a time. The
predictions equal batch size 1 up to float summation order (a different matrix shape
may sum in another order and, rarely, flip a near-tied greedy choice).

Perplexity: for the first ``ppl_windows`` samples (of ``ppl_samples`` where given: the
same seeded bench drawn to at least ``ppl_windows`` samples, so the window count does
not depend on how many completions are scored), the window is the last
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

from ..models.lm import CausalLM
from ..progress import Progress
from ..progress import bar as progress_bar
from .checkpoint import CompletionCheckpoint
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


def _stop_rule(tok, cfg: CompletionConfig):
    eos = _eos_ids(tok)

    def stop(out: list[int]) -> bool:  # end of line (after some content) or end of text
        return out[-1] in eos or "\n" in _relevant(_decode(tok, out), cfg.prompt).lstrip()
    return stop


def _prediction(tok, out: list[int], cfg: CompletionConfig) -> str:
    return first_line(_relevant(_decode(tok, out), cfg.prompt))


def complete_line(lm: CausalLM, tok, sample: Sample, cfg: CompletionConfig,
                  max_positions: int | None = None) -> str:
    """Greedy completion of the sample's target line (stripped)."""
    out = lm.greedy(prompt_ids(tok, sample, cfg, max_positions), cfg.max_new_tokens,
                    _stop_rule(tok, cfg))
    return _prediction(tok, out, cfg)


def complete_lines(lm: CausalLM, tok, samples: list[Sample], cfg: CompletionConfig,
                   max_positions: int | None = None) -> list[str]:
    """``complete_line`` of up to ``lm.batch_size`` samples in one batch
    (``lm.greedy_batch``: left-padded, same stop rule); equal to one at a time up to
    float summation order."""
    prompts = [prompt_ids(tok, s, cfg, max_positions)[0].tolist() for s in samples]
    outs = lm.greedy_batch(prompts, cfg.max_new_tokens, _stop_rule(tok, cfg))
    return [_prediction(tok, out, cfg) for out in outs]


def batch_rows(lm: CausalLM, batch_size: int) -> int:
    """Rows per forward: ``batch_size`` capped at what ``lm`` runs (1 without
    ``greedy_batch``; a graph's fixed batch)."""
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size}: at least 1")
    if not hasattr(lm, "greedy_batch"):
        return 1
    cap = getattr(lm, "batch_size", None)
    return min(batch_size, cap) if cap else batch_size


def _batches(samples: list[Sample], rows: int, key) -> list[list[int]]:
    """Sample indices in batches of ``rows``, longest prompts first (less padding);
    rows 1: in order."""
    order = range(len(samples)) if rows == 1 else sorted(
        range(len(samples)), key=lambda i: -key(samples[i]))
    order = list(order)
    return [order[i:i + rows] for i in range(0, len(order), rows)]


def score_completion(lm: CausalLM, tok, samples: list[Sample], cfg: CompletionConfig,
                     max_positions: int | None = None, progress: Progress = True,
                     desc: str = "complete", batch_size: int = 1,
                     checkpoint: CompletionCheckpoint | None = None) -> dict:
    """EM (percent), ES (0-100) and per-sample predictions (in ``samples``' order).
    ``batch_size`` > 1: that many samples per forward where ``lm`` can
    (``batch_rows``), the longest prompts together; the progress bar counts samples
    (rate and ETA in samples/s). ``checkpoint``: predictions saved as batches finish
    and, from an earlier interrupted run with the same header, read back (its whole
    batches skipped; ``resumed`` counts their samples; ``qdsl.eval.checkpoint``)."""
    t0, c0 = time.time(), time.process_time()
    rows_per = batch_rows(lm, batch_size)
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids) and checkpoint is not None:
        raise ValueError("a completion checkpoint needs distinct sample ids")
    saved, s_prev, c_prev = checkpoint.load() if checkpoint else ({}, 0.0, 0.0)
    done: dict[str, str] = {}
    resumed = 0
    preds: list[str | None] = [None] * len(samples)
    bar = progress_bar(total=len(samples), desc=desc, progress=progress, unit="sample",
                       postfix={"batch": rows_per})

    def save(force: bool = False) -> None:
        if checkpoint is not None:
            checkpoint.save(done, s_prev + time.time() - t0,
                            c_prev + time.process_time() - c0, force=force)

    with bar:
        for idx in _batches(samples, rows_per,
                            lambda s: len(prompt_ids(tok, s, cfg, max_positions)[0])):
            batch = [samples[i] for i in idx]
            if all(s.id in saved for s in batch):
                got = [saved[s.id] for s in batch]
                resumed += len(batch)
            else:
                got = (complete_lines(lm, tok, batch, cfg, max_positions) if rows_per > 1
                       else [complete_line(lm, tok, batch[0], cfg, max_positions)])
            for i, pred in zip(idx, got):
                preds[i] = done[ids[i]] = pred
            bar.update(len(idx))
            save()
    save(force=True)
    if resumed:
        log.info("%s: %d of %d completions read back from %s", desc, resumed, len(ids),
                 checkpoint.path)
    rows = [{"id": s.id, "target": s.target.strip(), "pred": p,
             "em": exact_match(p, s.target), "es": edit_similarity(p, s.target)}
            for s, p in zip(samples, preds)]
    return {"n": len(rows), "em": 100 * mean(r["em"] for r in rows),
            "es": mean(r["es"] for r in rows),
            "seconds": round(s_prev + time.time() - t0, 2),
            "cpu_seconds": round(c_prev + time.process_time() - c0, 2),
            "resumed": resumed, "samples": rows}


@torch.inference_mode()
def _window_logits(lm: CausalLM, windows: list[list[int]], rows: int):
    """(ids [1, T], logits [T, V]) per window, ``rows`` windows per forward where
    ``lm`` runs batches (``logits_rows``: left-padded; equal to one at a time up to
    float summation order)."""
    for i in range(0, len(windows), rows):
        chunk = windows[i:i + rows]
        got = (lm.logits_rows(chunk) if rows > 1
               else [lm.logits(torch.tensor(chunk, dtype=torch.long))[0]])
        yield from zip((torch.tensor([ids], dtype=torch.long) for ids in chunk), got)


def score_perplexity(lm: CausalLM, tok, samples: list[Sample], n_windows: int,
                     window: int = 256, max_positions: int | None = None,
                     progress: Progress = True, batch_size: int = 1,
                     checkpoint: CompletionCheckpoint | None = None) -> dict:
    """Perplexity and bits per byte over the first n_windows samples' windows
    (``batch_size`` windows per forward where ``lm`` can, as ``score_completion``).
    ``checkpoint``: windows saved as chunks finish and, from an earlier interrupted run
    with the same header, read back (whole chunks skipped; ``resumed`` counts their
    windows; ``seconds`` includes the earlier runs')."""
    if max_positions:
        window = min(window, max_positions)
    t0 = time.time()
    windows = [ids for ids in (_encode(tok, s.context + s.target + "\n")[-window:]
                               for s in samples[:n_windows]) if len(ids) >= 2]
    rows = batch_rows(lm, batch_size) if hasattr(lm, "logits_rows") else 1
    saved = checkpoint.saved_windows() if checkpoint is not None else {}
    s_prev = checkpoint.ppl_seconds if saved else 0.0
    got: dict[int, list] = {}    # window index -> [summed NLL, tokens, bytes]
    resumed = 0
    with progress_bar(total=len(windows), desc="perplexity", progress=progress,
                      unit="window") as bar:
        for start in range(0, len(windows), rows):
            idx = range(start, min(start + rows, len(windows)))
            if all(i in saved for i in idx):
                got.update((i, saved[i]) for i in idx)
                resumed += len(idx)
            else:
                chunk = [windows[i] for i in idx]
                for i, (x, logits) in zip(idx, _window_logits(lm, chunk, rows)):
                    ids = x[0].tolist()
                    w = F.cross_entropy(logits[:-1].float(), x[0, 1:], reduction="sum").item()
                    got[i] = [w, len(ids) - 1, len(_decode(tok, ids[1:]).encode("utf-8"))]
            bar.update(len(idx))
            if checkpoint is not None:
                checkpoint.save_ppl(got, s_prev + time.time() - t0)
    if checkpoint is not None:
        checkpoint.save_ppl(got, s_prev + time.time() - t0, force=True)
    if resumed:
        log.info("perplexity: %d of %d windows read back from %s", resumed, len(windows),
                 checkpoint.path)
    per = [got[i] for i in range(len(windows))]
    nll = sum(w for w, _, _ in per)
    n_tok, n_bytes = sum(t for _, t, _ in per), sum(b for _, _, b in per)
    return {"windows": min(n_windows, len(samples)), "window": window, "tokens": n_tok,
            "ppl": perplexity(nll, n_tok), "bpb": bits_per_byte(nll, n_bytes),
            "window_nll": [w / t for w, t, _ in per], "window_tokens": [t for _, t, _ in per],
            "seconds": round(s_prev + time.time() - t0, 2), "resumed": resumed}


def execution(lm: CausalLM, rows: int) -> dict:
    """The execution path a row's completions ran on: what, besides the model, can change
    a greedy completion through float summation order (``qdsl compare`` names the
    fields two rows differ in). ``runner``: ``transformers`` (a float model's own
    forward) or ``graph`` (a captured graph; ``graph, compiled step`` when its decode
    step is compiled); rows per forward, torch threads, the CPU capability torch's
    kernels dispatch on, and the torch version."""
    step = getattr(lm, "step", None)
    runner = ("transformers" if not hasattr(lm, "gm") else
              "graph, compiled step" if step is not None else "graph")
    return {"runner": runner, "batch_size": rows, "threads": torch.get_num_threads(),
            "cpu": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def evaluate(lm: CausalLM, tok, samples: list[Sample], cfg: CompletionConfig, *,
             max_positions: int | None = None, ppl_windows: int = 64,
             progress: Progress = True, batch_size: int = 1,
             ppl_samples: list[Sample] | None = None,
             checkpoint: CompletionCheckpoint | None = None) -> dict:
    """Line completion + perplexity for one model -> a JSON-able dict (``batch_size``:
    samples / windows per forward where the model can, see ``score_completion``;
    ``ppl_samples``: the samples whose windows perplexity scores, default ``samples``;
    ``checkpoint``: the completions' and perplexity's (``score_completion``,
    ``score_perplexity``))."""
    out = {"model": getattr(lm, "name", "model"), "ctx_tokens": cfg.ctx_tokens,
           "max_new_tokens": cfg.max_new_tokens, "prompt": cfg.prompt,
           "max_positions": max_positions, "batch_size": batch_rows(lm, batch_size),
           "execution": execution(lm, batch_rows(lm, batch_size))}
    comp = score_completion(lm, tok, samples, cfg, max_positions, progress,
                            desc=f"{out['model']}: complete", batch_size=batch_size,
                            checkpoint=checkpoint)
    out.update({k: comp[k] for k in ("n", "em", "es")})
    if comp["resumed"]:
        out["resumed"] = comp["resumed"]
    out["complete_seconds"] = comp["seconds"]
    out["complete_cpu_seconds"] = comp["cpu_seconds"]   # < wall time on a shared machine
    if ppl_windows > 0:
        p = score_perplexity(lm, tok, samples if ppl_samples is None else ppl_samples,
                             ppl_windows, cfg.ctx_tokens, max_positions, progress,
                             batch_size=batch_size, checkpoint=checkpoint)
        out.update({"ppl": p["ppl"], "bpb": p["bpb"], "ppl_windows": p["windows"],
                    "ppl_tokens": p["tokens"], "ppl_seconds": p["seconds"],
                    "ppl_window_nll": p["window_nll"], "ppl_window_tokens": p["window_tokens"]})
        if p["resumed"]:
            out["ppl_resumed"] = p["resumed"]
    out["samples"] = comp["samples"]
    return out
