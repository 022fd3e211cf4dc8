"""What a ``qdsl sweep`` job is, shared by the modules that plan, run and report it.

``SweepConfig`` (the sweep's settings), ``Job`` (one recipe or the float baseline,
and a kind), the settings a job compiles with and the static cache its graphs get,
and ``LoadedModel``: the model a worker process loaded once, with the float
statistics measured on it (``qdsl.study.layerstats``). ``qdsl.study.sweep`` plans
and keys the jobs, ``qdsl.study.sweepjob`` runs one, ``qdsl.study.tables`` reports
them; each imports this module and none of them imports another's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config.recipe import Settings
from ..resources import data_dir

# job kinds
QUALITY = "quality"      # compile; completion, perplexity, storage, per-layer statistics
ROBUST = "robust"        # the quality job's model on perturbed contexts
HUMANEVAL = "humaneval"  # the quality job's model on HumanEval pass@1


@dataclass(frozen=True)
class SweepConfig:
    model: str = "smollm2-135m"
    bench: str = "stdlib"
    n: int = 100                 # completion samples
    bench_seed: int = 0
    ppl_windows: int = 32
    ctx_tokens: int = 256
    max_new_tokens: int = 48
    prompt: str | None = None    # None: the model's best measured prompt mode
    calib: str = "stdlib"        # calibration data (stdlib = non-test stdlib sources)
    calib_default: int = 32      # windows, for recipes that set none
    calib_samples: int | None = None  # force this many windows (not on wei-fig7)
    calib_seq_len: int = 256
    calib_seed: int = 0
    layer_windows: int = 4       # Fig. 6b: max |x| per layer over this many windows
    layer_tokens: int = 128      # tokens per layer-statistics window
    perturb_prob: float = 0.35   # robust jobs: NL-Augmenter ChangeCharCase probability
    perturb_seed: int = 0
    threads: int = 1             # torch threads per job (2 threads on 2 busy cores: ~10x slower)
    bench_int8: bool = True      # run qdsl bench for lower = int8 recipes
    humaneval: int = 0           # HumanEval problems for pass@1 tables (0: no HumanEval jobs)
    humaneval_tokens: int = 300  # new tokens per HumanEval completion
    unsafe_exec: bool = False    # no bubblewrap: run HumanEval's code with rlimits only
    batch_size: int | None = None  # samples / windows per forward (None: eval_batch's default)
    # quality jobs grow this n's finished entry to n: only the new samples run, as their own
    # batches, on its saved artifact (qdsl.study.sweepjob.grow); None: every job from scratch
    grow_from: int | None = None


def recipe_path(recipe: str) -> str:
    """A table's recipe (relative to the shipped recipes/) or a user's path -> a path."""
    p = Path(recipe)
    return str(p) if p.is_absolute() or p.exists() else str(data_dir("recipes") / recipe)


@dataclass(frozen=True)
class Job:
    recipe: str | None   # path of a .qrec file; None = the float baseline
    kind: str = QUALITY  # QUALITY | ROBUST | HUMANEVAL
    lower: str | None = None  # overrides the recipe's `set lower` ("int8": real lowering)
    own_calib: bool = False   # the recipe's calibration size wins over --calib-samples

    @classmethod
    def of(cls, row, kind: str = QUALITY) -> Job:
        """The job of a table row (``qdsl.study.tables.Row``): its ``runs_as`` recipe's
        where it names one (the same plan), else its own recipe's."""
        recipe = row.runs_as or row.recipe
        return cls(recipe_path(recipe) if recipe else None, kind, row.lower, row.own_calib)

    @property
    def label(self) -> str:
        """How the job's progress lines begin (``qdsl.progress``'s line mode), e.g.
        ``[storti/t2_w8a32 humaneval]``; quality jobs name only the recipe."""
        name = "fp32" if self.recipe is None else "/".join(Path(self.recipe).parts[-2:])
        name = name.removesuffix(".qrec")
        extra = [x for x in (self.lower and f"--lower {self.lower}",
                             self.kind != QUALITY and self.kind) if x]
        return f"[{' '.join([name, *extra])}]"


def prompt_mode(cfg: SweepConfig) -> str:
    """The completion prompt mode the sweep evaluates with."""
    # here, not at the top: every qdsl command builds its parser from SweepConfig, and
    # qdsl.eval.complete imports torch
    from ..eval.complete import DEFAULT_PROMPT, PROMPT_BY_MODEL

    return cfg.prompt or PROMPT_BY_MODEL.get(str(cfg.model).lower(), DEFAULT_PROMPT)


# a compiled row's batch without --batch-size: 1, what qdsl eval's default was when the
# committed caches were written (a compiled row's key records its batch when > 1, so a
# default of 8 would miss every one of them); qdsl eval itself defaults to 8 since
# session 38, and the study's runs pass --batch-size 8
COMPILED_ROW_BATCH = 1


def eval_batch(cfg: SweepConfig, job: Job) -> int:
    """Completions and perplexity windows per forward for ``job``: ``cfg.batch_size``, or
    ``qdsl eval``'s default for the float model (``qdsl.eval.run.DEFAULT_BATCH_SIZE``, 8)
    and ``COMPILED_ROW_BATCH`` (1) for a compiled row, HumanEval problems likewise. A
    compiled row whose plan cannot batch (``qdsl.compiler.loading.batch_mixing``) runs 1
    whatever this says, with a warning."""
    if cfg.batch_size is not None:
        return cfg.batch_size
    # here, not at the top: qdsl.eval.run imports torch (see prompt_mode)
    from ..eval.run import DEFAULT_BATCH_SIZE

    return DEFAULT_BATCH_SIZE if job.recipe is None else COMPILED_ROW_BATCH


def effective_settings(recipe, cfg: SweepConfig, lower: str | None = None,
                       own_calib: bool = False):
    """Sweep defaults, then the recipe's own settings, then forced overrides
    (``--calib-samples`` except where ``own_calib``: Fig. 7's rows vary exactly that)."""
    st = Settings(calib_samples=cfg.calib_default, calib_seq_len=cfg.calib_seq_len,
                  calib_seed=cfg.calib_seed, calib_data=cfg.calib).then(recipe.settings)
    forced = None if own_calib else cfg.calib_samples
    return st.then(Settings(calib_samples=forced, lower=lower))


def fit(need: int, max_pos: int | None) -> int:
    """``need`` cache slots, at most the model's positions."""
    return min(need, max_pos) if max_pos else need


def cache_len(cfg: SweepConfig, max_pos: int | None) -> int:
    """Static key/value cache of the compiled graphs: room for the longest sequence the
    sweep runs (prompt + new tokens, a calibration or perplexity window), no more:
    decode attends over the whole cache, so a 1024 cache is ~3x slower than 320."""
    need = max(cfg.ctx_tokens + cfg.max_new_tokens, cfg.calib_seq_len, cfg.layer_tokens) + 2
    return fit(need, max_pos)


@dataclass
class LoadedModel:
    """A model loaded once per process: the model, its tokenizer, its maximum positions,
    and the float layer statistics measured on it (``qdsl.study.layerstats``), keyed by
    (windows, tokens); they live and go with the model."""
    name: str
    model: Any
    tok: Any
    max_pos: int | None
    float_ref: dict = field(default_factory=dict)
