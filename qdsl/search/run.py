"""``qdsl search``: candidates -> units -> sensitivity -> allocation -> recipe file."""

from __future__ import annotations

import logging
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..artifact.store import module_hash
from ..atomic.files import write_json_atomic, write_text_atomic
from ..errors import OptionError
from ..eval.hosting_hw import read_bandwidth_gbs
from ..graph.capture import capture, max_positions
from ..graph.naming import name_graph
from ..models import zoo
from ..models.calib import CalibSpec, calibration_windows
from ..models.limits import Limit, fit_length
from .allocate import Allocation, BudgetError, allocate
from .candidates import parse_candidates
from .measure import Measured, held_out, measure
from .sensitivity import Prober, Sensitivity
from .state import SearchState, scorer_version, windows_hash
from .transforms import TransformOption, parse_transforms
from .transforms import apply as apply_transforms
from .units import Space, build_space
from .write import recipe_text

log = logging.getLogger(__name__)
KINDS = ("budget", "size", "decode_ms")


@dataclass
class SearchConfig:
    model: str
    candidates: str
    kind: str                       # "budget" (bits per weight) | "size" (MB) | "decode_ms"
    value: float
    out: str
    act_bits: float | None = None
    activations: str = "inputs"     # "inputs" | "all"
    calib: str = "stdlib"
    samples: int = 32
    seq_len: int = 256
    batch: int = 4
    check: int = 12
    check_windows: int = 8
    seed: int = 0
    threads: int | None = None
    report: str | None = None
    progress: bool = True
    command: list[str] = field(default_factory=list)
    measure: bool = True            # compile the found recipe and measure its loss
    measure_bench: str = "stdlib"   # held-out windows: `qdsl eval --bench`'s samples
    measure_windows: int = 16
    resume: bool = True             # reuse a saved state made with the same arguments
    transforms: str = "none"        # `;`-separated transform prefixes searched (transforms.py)
    notify: Callable[[str], None] | None = None   # one-line notices (resumed, ignored)


@dataclass
class SearchResult:
    space: Space
    sensitivity: Sensitivity
    allocation: Allocation
    max_bytes: float
    text: str
    seconds: dict[str, float]
    bandwidth_gbs: float | None = None
    measured: Measured | None = None
    resumed: str | None = None
    transform: str = "none"         # the chosen --transforms option
    options: list = field(default_factory=list)   # OptionRun per option searched


def least_bytes(space: Space) -> float:
    return space.fixed_bytes + sum(min(c.bytes for c in u.choices) for u in space.units)


def budget_bytes(space: Space, kind: str, value: float, threads: int) -> tuple[float, float | None]:
    """(the most bytes the budget allows, the read bandwidth for decode_ms).
    decode_ms: a decode step reads every weight but gather-only embedding rows once,
    at the read bandwidth this machine measures (``eval.hosting_hw``): a bandwidth
    bound, not a measured latency."""
    if kind == "budget":
        return space.fixed_bytes + value / 8 * space.searched_numel, None
    if kind == "size":
        return value * 1e6, None
    if kind == "decode_ms":
        bw = read_bandwidth_gbs(threads)
        return value / 1e3 * bw * 1e9 + space.gather_bytes, bw
    raise OptionError(f"unknown budget kind {kind!r}")


def _describe_budget(cfg: SearchConfig, max_bytes: float, bw: float | None) -> str:
    if cfg.kind == "budget":
        return f"--budget {cfg.value:g} bits per searched weight ({max_bytes / 1e6:.3f} MB)"
    if cfg.kind == "size":
        return f"--size {cfg.value:g} MB"
    return (f"--decode-ms {cfg.value:g}: bandwidth bound, {bw:.2f} GB/s read bandwidth "
            f"measured -> {max_bytes / 1e6:.3f} MB")


def search(cfg: SearchConfig) -> SearchResult:
    """Run the search and write ``cfg.out`` (and ``cfg.report``) atomically at the end:
    an interruption leaves no partial file. With several ``--transforms`` options each
    is searched on its own transformed graph and the lowest measured (else predicted)
    loss wins."""
    cands = parse_candidates(cfg.candidates)          # located errors before any model work
    options = parse_transforms(cfg.transforms)
    if cfg.kind not in KINDS or not cfg.value > 0:
        raise OptionError(f"the budget must be positive, got {cfg.value!r}")
    threads = cfg.threads or torch.get_num_threads()
    held = (held_out(cfg.measure_bench, cfg.measure_windows, cfg.seed)  # a bad bench: now
            if cfg.measure else None)
    t0 = time.perf_counter()
    model, tok = zoo.load_model(cfg.model, require_causal=True)
    positions = max_positions(model)   # the plain graph takes one token less
    fit_length("--seq-len", cfg.seq_len, cfg.seq_len,
               Limit(positions - 1, f"the captured graph takes {positions - 1} tokens"))
    graphs = []
    for opt in options:   # every option's structure, then its budget, before any data
        captured = capture(model, mode="plain")
        graphs.append((captured.gm, apply_transforms(opt, captured.gm, name_graph(captured))))
    prepared = []
    for opt, (gm, named) in zip(options, graphs):
        # sizes can differ between options: rotate unties a tied lm_head (its own copy)
        space = build_space(gm, named, cands, cfg.activations)
        max_bytes, bw = budget_bytes(space, cfg.kind, cfg.value, threads)
        if least_bytes(space) > max_bytes + 1e-6:
            try:
                allocate(space, [[0.0] * len(u.choices) for u in space.units], max_bytes,
                         cfg.act_bits, what=cfg.kind.replace("_", "-"))
            except BudgetError as e:
                if len(options) == 1:
                    raise
                raise BudgetError(f"--transforms option `{opt.label}`: {e}") from None
        prepared.append((gm, named, space, max_bytes, bw))
    load_s = time.perf_counter() - t0
    windows = calibration_windows(CalibSpec(cfg.calib, cfg.samples, cfg.seq_len, cfg.seed), tok)
    runs = []
    for opt, (gm, named, space, max_bytes, bw) in zip(options, prepared):
        runs.append(_search_option(cfg, opt, len(options) > 1, model, tok, gm, named, space,
                                   windows, held, max_bytes, bw))
    best = min(runs, key=lambda r: r.loss)
    times = {"load_capture": load_s, **best.times, "total": time.perf_counter() - t0}
    header = _header(cfg, best.space, best.sens, best.alloc, best.max_bytes, best.bw,
                     len(windows), times, best.measured, best.note,
                     runs if len(runs) > 1 else None)
    text = recipe_text(best.space, best.alloc.picks, best.blocks, header, best.option.statements)
    result = SearchResult(best.space, best.sens, best.alloc, best.max_bytes, text, times, best.bw,
                          best.measured, best.note, best.option.label, runs)
    if cfg.report:
        write_json_atomic(cfg.report, report_json(cfg, result))
    write_text_atomic(cfg.out, text)
    for r in runs:
        r.state.remove()
    return result


@dataclass
class OptionRun:
    """One ``--transforms`` option searched: its allocation and losses."""

    option: TransformOption
    space: Space
    sens: Sensitivity
    alloc: Allocation
    measured: Measured | None
    blocks: int
    times: dict[str, float]
    state: SearchState
    note: str | None
    max_bytes: float            # the budget in bytes for this option's space
    bw: float | None            # the read bandwidth (decode_ms budgets)

    @property
    def predicted(self) -> float:
        return self.sens.base_loss + self.alloc.score

    @property
    def loss(self) -> float:
        return self.measured.loss if self.measured is not None else self.predicted


def _search_option(cfg, opt, multi, model, tok, gm, named, space, windows, held,
                   max_bytes, bw) -> OptionRun:
    times: dict[str, float] = {}
    state, note = _open_state(cfg, model, windows, opt if multi else None)
    prober = Prober(gm, named, space)
    t = time.perf_counter()
    prober.observe(windows, cfg.batch, cfg.progress)
    times["observe"] = time.perf_counter() - t
    t = time.perf_counter()
    sens = _score(cfg, prober, state, windows)
    times["score"] = time.perf_counter() - t
    t = time.perf_counter()
    prober.check(sens, windows[:cfg.check_windows], cfg.batch, cfg.check, cfg.seed, cfg.progress,
                 on_pair=lambda s: state.save_scored(s.scores, s.base_loss, s.windows,
                                                     s.check_base, s.checks))
    times["check"] = time.perf_counter() - t
    alloc = allocate(space, sens.scores, max_bytes, cfg.act_bits, what=cfg.kind.replace("_", "-"))
    measured = None
    if cfg.measure:
        t = time.perf_counter()
        rules_only = recipe_text(space, alloc.picks, named.blocks, [], opt.statements)
        measured = measure(model, tok, rules_only, windows, bench=cfg.measure_bench,
                           n=cfg.measure_windows, seed=cfg.seed, samples=held,
                           progress=cfg.progress)
        times["measure"] = time.perf_counter() - t
    return OptionRun(opt, space, sens, alloc, measured, named.blocks, times, state, note,
                     max_bytes, bw)


def state_key(cfg: SearchConfig, model, windows, option: TransformOption | None = None) -> dict:
    """What the scores depend on (``qdsl.search.state``); with several ``--transforms``
    options, each has its own state and key."""
    key = {"model": cfg.model, "model_hash": module_hash(model), "candidates": cfg.candidates,
           "activations": cfg.activations, "calib": cfg.calib, "samples": cfg.samples,
           "seq_len": cfg.seq_len, "seed": cfg.seed, "windows": windows_hash(windows),
           "batch": cfg.batch, "check": cfg.check, "check_windows": cfg.check_windows,
           "scorer": scorer_version()}
    if option is not None:
        key["transforms"] = option.label
    return key


def _open_state(cfg: SearchConfig, model, windows,
                option: TransformOption | None = None) -> tuple[SearchState, str | None]:
    key = state_key(cfg, model, windows, option)
    out = Path(cfg.out)
    if option is not None:   # found.qrec.rotate.partial.json beside found.qrec
        out = out.with_name(f"{out.name}.{re.sub(r'[^A-Za-z0-9]+', '_', option.label)}")
    if cfg.resume:
        state, note = SearchState.open(out, key)
    else:
        state, note = SearchState(out, key), None
    if note:
        (cfg.notify or log.warning)(note)
    return state, (note if state.stage != "new" else None)


def _score(cfg: SearchConfig, prober: Prober, state: SearchState, windows) -> Sensitivity:
    """The scores: reused whole from a state past scoring, else scored from where a
    saved state stopped, the state saved after every batch."""
    if state.stage == "scored":
        return Sensitivity(state.scores, state.base_loss, state.windows,
                           checks=list(state.checks), check_base=state.check_base)
    if state.stage == "score":
        prober.restore_score(state.act_scores, state.fisher)
    sens = prober.score(windows, cfg.batch, cfg.progress, losses=state.losses,
                        on_batch=lambda losses: state.save_score(losses, *prober.score_state()))
    state.save_scored(sens.scores, sens.base_loss, sens.windows, None, [])
    return sens


def _header(cfg, space, sens, alloc, max_bytes, bw, n_windows, times, measured=None,
            resumed=None, runs=None) -> list[str]:
    used = {space.units[u].choices[i].candidate for u, i in enumerate(alloc.picks)}
    counts = [f"{sum(space.units[u].choices[i].candidate == c for u, i in enumerate(alloc.picks))}"
              f" x `{space.candidates[c].text}`" for c in sorted(used)]
    act = "" if alloc.act_bits is None else f", mean activation bits {alloc.act_bits:.2f}" + (
        f" (limit {cfg.act_bits:g})" if cfg.act_bits is not None else "")
    check = ("no direct check" if sens.spearman is None else
             f"score vs direct loss change of {len(sens.checks)} (unit, candidate) pairs "
             f"quantized alone on {min(cfg.check_windows, n_windows)} windows: Spearman "
             f"rho = {sens.spearman:.2f}")
    cmd = cfg.command or ["qdsl", "search", "--model", cfg.model]
    head = [
        f"Found by `qdsl search` (docs/search.md) for {cfg.model}.",
        f"Budget: {_describe_budget(cfg, max_bytes, bw)}. Found: {alloc.bytes / 1e6:.3f} MB "
        f"parameter storage ({space.bits_per_weight(alloc.picks):.3f} bits per searched "
        f"weight, scales included){act}.",
        f"Units: {len(space.units)} ({', '.join(counts)}); the rest of the model stays float.",
        f"Predicted loss: {sens.base_loss:.4f} (float) + {alloc.score:.4f} (Fisher score) = "
        f"{sens.base_loss + alloc.score:.4f} nats/token on the {n_windows} calibration windows "
        f"({cfg.calib}, {cfg.seq_len} tokens, seed {cfg.seed}).",
        measured.line() if measured is not None else "Measured: not measured (--no-measure).",
        f"Check: {check}.",
        *([_transforms_line(runs)] if runs else []),
        f"Search: {times['total'] / 60:.1f} min on {torch.get_num_threads()} threads"
        + (" (this run; it resumed a saved state)." if resumed else "."),
        "Command: " + " ".join(shlex.quote(c) for c in cmd),
    ]
    return head


def _transforms_line(runs) -> str:
    by = "measured" if all(r.measured is not None for r in runs) else "predicted"
    best = min(runs, key=lambda r: r.loss)
    parts = [f"`{r.option.label}` predicted {r.predicted:.4f}" + (
        f", measured {r.measured.loss:.4f}" if r.measured is not None else "") for r in runs]
    return (f"Transforms searched: {'; '.join(parts)} nats/token; chosen `{best.option.label}` "
            f"(lowest {by} loss).")


def report_json(cfg: SearchConfig, r: SearchResult) -> dict:
    sp = r.space
    return {"model": cfg.model, "candidates": [c.text for c in sp.candidates],
            "budget": {"kind": cfg.kind, "value": cfg.value, "max_bytes": r.max_bytes,
                       "bandwidth_gbs": r.bandwidth_gbs, "act_bits": cfg.act_bits},
            "found": {"bytes": r.allocation.bytes, "score": r.allocation.score,
                      "bits_per_weight": sp.bits_per_weight(r.allocation.picks),
                      "act_bits": r.allocation.act_bits,
                      "picks": {u.key: sp.candidates[u.choices[i].candidate].text
                                for u, i in zip(sp.units, r.allocation.picks)}},
            "sensitivity": r.sensitivity.to_json(sp), "seconds": r.seconds,
            "threads": torch.get_num_threads(), "calib": {
                "data": cfg.calib, "samples": cfg.samples, "seq_len": cfg.seq_len,
                "seed": cfg.seed, "batch": cfg.batch},
            "measured": None if r.measured is None else r.measured.to_json(),
            "resumed": r.resumed, "recipe": str(Path(cfg.out)),
            **({"transforms": {"chosen": r.transform, "options": [
                {"option": o.option.label, "statements": list(o.option.statements),
                 "predicted": o.predicted, "measured": None if o.measured is None
                 else o.measured.loss, "bytes": o.alloc.bytes, "seconds": o.times}
                for o in r.options]}} if len(r.options) > 1 else {})}
