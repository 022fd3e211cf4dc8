"""Robustness to perturbed natural language (Wei et al. 2023, RQ3, Table 7, adapted).

Wei et al. perturb HumanEval/MBPP prompts at character level with NL-Augmenter's
``ChangeCharCase`` (each character upper-cased with probability 0.35). Our prompts
are file prefixes, so only their natural language is perturbed: the text of
COMMENT tokens (after ``#``) and of docstrings (a STRING token standing alone as a
statement), found with ``tokenize``. Quotes, string prefixes, escape sequences and
every other token are untouched, so the code means the same. Seeded per sample.

    >>> perturb_code('x = 1  # add one\\n', seed=0, prob=1.0)
    'x = 1  # ADD ONE\\n'

The drop is reported as Table 7 does: %drop = 100 * (unperturbed - perturbed) / unperturbed.
"""

from __future__ import annotations

import io
import random
import tokenize
import zlib
from dataclasses import replace

from ..progress import Progress
from .complete import prompt_ids, score_completion

DEFAULT_PROB = 0.35  # NL-Augmenter ChangeCharCase default
_AFTER = {tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING}
_SKIP = {tokenize.NL, tokenize.COMMENT}


def _tokens(text: str) -> list[tokenize.TokenInfo]:
    """Tokens of ``text``; a prefix cut mid-statement yields the tokens before the error."""
    out: list[tokenize.TokenInfo] = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            out.append(tok)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return out


def _is_pragma(tok: tokenize.TokenInfo) -> bool:
    """Shebang and coding lines keep their case (they are read by tools)."""
    return tok.start[0] <= 2 and (tok.string.startswith("#!") or "coding" in tok.string)


def nl_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character offsets of the natural language in ``text``: comment
    bodies and docstring bodies (inside the quotes)."""
    starts, pos = [], 0
    for line in io.StringIO(text):
        starts.append(pos)
        pos += len(line)
    starts.append(pos)

    def offset(rc: tuple[int, int]) -> int:
        return starts[rc[0] - 1] + rc[1]

    toks = _tokens(text)
    spans = []
    for i, tok in enumerate(toks):
        if tok.type == tokenize.COMMENT and not _is_pragma(tok):
            spans.append((offset(tok.start) + 1, offset(tok.end)))
        elif tok.type == tokenize.STRING and _is_docstring(toks, i):
            s = tok.string
            body = s.lstrip("rRbBuUfF")
            q = 3 if body[:3] in ('"""', "'''") else 1
            a = offset(tok.start) + (len(s) - len(body)) + q
            spans.append((a, offset(tok.end) - q))
    return spans


def _is_docstring(toks: list[tokenize.TokenInfo], i: int) -> bool:
    """A string that is a statement by itself: after a statement boundary, before one."""
    j = i - 1
    while j >= 0 and toks[j].type in _SKIP:
        j -= 1
    k = i + 1
    while k < len(toks) and toks[k].type == tokenize.COMMENT:
        k += 1
    before = j < 0 or toks[j].type in _AFTER
    after = k >= len(toks) or toks[k].type in (tokenize.NEWLINE, tokenize.ENDMARKER)
    return before and after


def _upper_random(text: str, rng: random.Random, prob: float) -> str:
    out, prev = [], ""
    for c in text:
        out.append(c.upper() if prev != "\\" and c.isalpha() and c.islower()
                   and rng.random() < prob else c)
        prev = "" if prev == "\\" else c  # "\\\\n": the second backslash is escaped
    return "".join(out)


def perturb_code(text: str, seed: int, prob: float = DEFAULT_PROB) -> str:
    """``text`` with the letters of comments and docstrings randomly upper-cased."""
    rng = random.Random(seed)
    out, last = [], 0
    for a, b in nl_spans(text):
        out.append(text[last:a])
        piece = _upper_random(text[a:b], rng, prob)
        # upper-casing must not change the length (e.g. "ß" -> "SS"), or offsets drift
        out.append(piece if len(piece) == b - a else text[a:b])
        last = b
    out.append(text[last:])
    return "".join(out)


def perturb_samples(samples, seed: int = 0, prob: float = DEFAULT_PROB) -> list:
    """Each sample with its context perturbed (seed mixed with the sample id); the
    target line is left as is."""
    return [replace(s, context=perturb_code(s.context, zlib.crc32(f"{seed}:{s.id}".encode()),
                                            prob)) for s in samples]


def pct_drop(clean: float | None, perturbed: float | None) -> float | None:
    """Table 7's %drop; None when undefined (a clean score of 0)."""
    if clean is None or perturbed is None or clean == 0:
        return None
    return 100.0 * (clean - perturbed) / clean


def robust_scores(lm, tok, samples, ccfg, *, max_positions: int | None = None,
                  prob: float = DEFAULT_PROB, seed: int = 0, progress: Progress = False,
                  batch_size: int = 1) -> dict:
    """Clean vs perturbed EM / ES of one model (``qdsl.models.lm.CausalLM``). A sample whose
    prompt tokens the perturbation leaves unchanged (it touched only text before the
    prompt window) has the same prediction by construction and is decoded once.
    ``batch_size``: samples per forward, as ``score_completion``."""
    pert = perturb_samples(samples, seed, prob)
    changed = [i for i, (a, b) in enumerate(zip(samples, pert))
               if not prompt_ids(tok, a, ccfg, max_positions).equal(
                   prompt_ids(tok, b, ccfg, max_positions))]
    clean = score_completion(lm, tok, samples, ccfg, max_positions, progress,
                             desc="clean", batch_size=batch_size)["samples"]
    moved = score_completion(lm, tok, [pert[i] for i in changed], ccfg, max_positions,
                             progress, desc="perturbed", batch_size=batch_size)["samples"]
    perturbed = list(clean)
    for i, r in zip(changed, moved):
        perturbed[i] = r
    n = max(1, len(samples))
    em, es = 100 * sum(r["em"] for r in clean) / n, sum(r["es"] for r in clean) / n
    em_p = 100 * sum(r["em"] for r in perturbed) / n
    es_p = sum(r["es"] for r in perturbed) / n
    return {"n": len(samples), "changed": len(changed), "em": em, "es": es,
            "em_perturbed": em_p, "es_perturbed": es_p, "em_drop_pct": pct_drop(em, em_p),
            "es_drop_pct": pct_drop(es, es_p),
            "perturbed_samples": [{**{k: r[k] for k in ("id", "pred", "em", "es")},
                                   "es_clean": clean[i]["es"]} for i, r in zip(changed, moved)]}
