"""``qdsl train``: quantization-aware distillation of the student a recipe describes.

    teacher (float) ──student.blocks──▶ student (a copy, maybe fewer blocks)
        ──qat.attach(recipe plan)──▶ fake-quant student (straight-through)
        ──AdamW, warm-up + linear decay, XTC loss against the teacher──▶ trained floats
        ──qat.detach, compiler.compile(lower int8)──▶ OUT (an ordinary qdsl artifact)

Checkpoints (``checkpoint.py``) every ``ckpt_every`` steps in the run directory;
``resume=True`` continues from the last one exactly (same batches, same RNG, same
optimizer state: the next loss is the one an uninterrupted run computes). Ctrl-C stops
between steps and leaves the last checkpoint as it was.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..compiler.build import as_model, as_recipe, compile, explain, student_of
from ..errors import ModelError
from ..models.student import find_blocks
from ..progress import bar as progress_bar
from . import checkpoint
from .data import batch, held_out, token_streams
from .init import load_init
from .loss import LossWeights, distill_loss, run_model
from .qat import Freezer, attach, binary_signs, binary_weights, dampening, detach, flip_fraction


CALIB_SEED = 1_000_003  # calibration windows (static activations) for the export
LR, WARMUP = 5e-4, 0.2  # de Moor's peak learning rate and warm-up fraction (the defaults)


@dataclass(frozen=True)
class TrainConfig:
    """The schedule. de Moor: 1 epoch, lr 5e-4, warm-up 0.2; XTC: lr 5e-5, 1 of 18
    epochs warm-up; both decay linearly to 0."""

    steps: int = 200
    batch_size: int = 8
    seq_len: int = 128
    accumulate: int = 1          # micro-batches per optimizer step
    lr: float | None = None      # peak; None: the recipe's `set train.lr`, else LR
    warmup: float | None = None  # fraction of the steps; None: `set train.warmup`, else WARMUP
    weight_decay: float = 0.01
    clip: float = 1.0            # gradient norm
    seed: int = 0
    ckpt_every: int = 50         # steps
    eval_every: int = 0          # steps (0: only at the end)
    eval_windows: int = 16
    data: str = "stdlib"
    max_tokens: int = 4_000_000  # training tokens tokenised (the stream batches are drawn from)
    loss: LossWeights = field(default_factory=LossWeights)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def resolved(self, settings) -> TrainConfig:
        """Unset ``lr`` / ``warmup`` from the recipe's ``set train.lr|warmup``, else the
        defaults (an explicit value, e.g. the command line's, wins over the recipe)."""
        return dataclasses.replace(self, lr=_first(self.lr, settings.train_lr, LR),
                                   warmup=_first(self.warmup, settings.train_warmup, WARMUP))


def _first(*values):
    return next(v for v in values if v is not None)


@dataclass
class TrainResult:
    out: Path | None
    run: Path
    steps: int
    tokens: int
    seconds: float
    history: list[dict]
    evals: list[dict]
    layer_map: tuple[int, ...]


def dampen_at(step: int, steps: int, weight: float) -> float:
    """The oscillation dampening weight at ``step``: rises from 0 to ``weight`` over the
    run with a half cosine (Nagel et al. 2022 anneal it likewise: early steps move freely,
    late ones are held to their grid points)."""
    return weight * (1 - math.cos(math.pi * min(step, steps) / max(1, steps))) / 2


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup * steps`` steps, then linear decay to 0."""
    warm = max(1, round(cfg.warmup * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * max(0.0, (cfg.steps - step) / max(1, cfg.steps - warm))


class Trainer:
    """The teacher, the quantized student, its optimizer and data: one training run."""

    def __init__(self, recipe, model, run: Path, cfg: TrainConfig, *, data_streams=None,
                 init=None):
        self.recipe, self.run = as_recipe(recipe), Path(run)
        self.cfg = cfg = cfg.resolved(self.recipe.settings)
        teacher, self.tokenizer, self.model_id = as_model(model)
        self.teacher = teacher.eval().requires_grad_(False)
        student, blocks = student_of(self.teacher, self.recipe)
        if blocks is None:
            student = copy.deepcopy(self.teacher)
        n = len(find_blocks(self.teacher)[1])
        self.layer_map = tuple(blocks) if blocks is not None else tuple(range(n))
        self.student = student.requires_grad_(True)
        self.init = None  # XTC step 2: the trained step-1 student's weights (init.py)
        if init is not None:
            self.init = load_init(self.student, init, model_id=self.model_id,
                                  student_blocks=self.recipe.settings.student_blocks)
        plain = dataclasses.replace(self.recipe, settings=dataclasses.replace(
            self.recipe.settings, student_blocks=None))  # self.student is reduced already
        exp = explain(plain, self.student)
        learned = self.recipe.settings.train_scales == "learned"
        self.quant = attach(self.student, exp.captured.gm, exp.named, exp.plan,
                            learned_scales=learned)
        params = list(self.student.named_parameters())
        scales = [p for n, p in params if n.endswith("log_scale")]  # LearnedScaleQuant's
        if learned and not scales:
            raise ModelError(f"{self.recipe.source}: `set train.scales = learned` learns the "
                             "scales of 1-bit weights, and this recipe has none")
        threshold = self.recipe.settings.train_freeze
        self.freezer = None  # `set train.freeze`: iterative freezing of oscillating 1-bit weights
        if threshold:
            weights = binary_weights(self.student, self.quant)
            if not weights:
                raise ModelError(f"{self.recipe.source}: `set train.freeze` freezes "
                                 "oscillating 1-bit weights, and this recipe has none")
            self.freezer = Freezer(weights, threshold)
        # learned 1-bit scales without weight decay: it would pull them to 1
        self.opt = torch.optim.AdamW(
            [{"params": [p for n, p in params if not n.endswith("log_scale")]},
             {"params": scales, "weight_decay": 0.0}],
            lr=cfg.lr, weight_decay=cfg.weight_decay)
        if data_streams is None:
            if self.tokenizer is None:
                raise ModelError("training from text needs the model's tokenizer")
            data_streams = token_streams(cfg.data, self.tokenizer, self.run, cfg.max_tokens)
        self.streams = data_streams
        self.step, self.tokens, self.seconds = 0, 0, 0.0
        self.history: list[dict] = []
        self.evals: list[dict] = []
        torch.manual_seed(cfg.seed)  # dropout in the student: resume restores this generator

    # ------------------------------------------------------------------ state
    def identity(self) -> dict:
        return {"recipe_hash": self.recipe.hash(), "model": self.model_id,
                "layer_map": list(self.layer_map), "config": self.cfg.to_json(),
                "init": self.init}

    def save(self) -> None:
        checkpoint.save(self.run, self.student, self.quant.act_modules, self.opt, {
            "step": self.step, "tokens": self.tokens, "seconds": self.seconds,
            "history": self.history, "evals": self.evals, "run": self.identity()},
            extra=self.freezer.state_dict() if self.freezer else None)

    def resume(self) -> None:
        extra: dict = {}
        state = checkpoint.load(self.run, self.student, self.quant.act_modules, self.opt, extra)
        mine, theirs = self.identity(), state.get("run", {})
        same_init = ((theirs.get("init") or {}).get("sha256")
                     == (mine["init"] or {}).get("sha256"))
        if not same_init:
            raise ModelError(f"--resume: the checkpoint in {self.run} was started from "
                             f"another --init ({theirs.get('init')} vs {mine['init']})")
        for key in ("recipe_hash", "model", "layer_map"):
            if theirs.get(key) != mine[key]:
                raise ModelError(f"--resume: the checkpoint in {self.run} was written for "
                                 f"another {key.replace('_', ' ')} ({theirs.get(key)} vs "
                                 f"{mine[key]})")
        if self.freezer is not None:
            self.freezer.load_state_dict(extra)
        self.step, self.tokens = state["step"], state["tokens"]
        self.seconds, self.history = state["seconds"], state["history"]
        self.evals = state.get("evals", [])

    # ------------------------------------------------------------------ steps
    def loss_weights(self) -> LossWeights:
        """The config's weights, overridden by the recipe's ``set train.*``."""
        st, w = self.recipe.settings, self.cfg.loss
        return LossWeights(*(v if v is not None else d for v, d in (
            (st.train_logits, w.logits), (st.train_hidden, w.hidden), (st.train_attn, w.attn))))

    def dampen_weight(self) -> float:
        """``set train.dampen`` (default 0: off)."""
        return self.recipe.settings.train_dampen or 0.0

    def micro_loss(self, ids: torch.Tensor):
        with torch.no_grad():
            t = run_model(self.teacher, ids)
        s = run_model(self.student, ids)
        return distill_loss(s, t, self.layer_map, self.loss_weights())

    def train_step(self) -> dict:
        """One optimizer step (``accumulate`` micro-batches); its record."""
        cfg = self.cfg
        self.student.train()
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, cfg)
        total, parts_sum = 0.0, {}
        for k in range(cfg.accumulate):
            ids = batch(self.streams["train"], self.step * cfg.accumulate + k, cfg.seed,
                        cfg.batch_size, cfg.seq_len)
            loss, parts = self.micro_loss(ids)
            (loss / cfg.accumulate).backward()
            total += float(loss.detach()) / cfg.accumulate
            for name, v in parts.items():
                parts_sum[name] = parts_sum.get(name, 0.0) + v / cfg.accumulate
            self.tokens += ids.numel()
        lam = dampen_at(self.step, cfg.steps, self.dampen_weight())
        if lam:  # once per optimizer step: it does not depend on the batch
            damp = dampening(self.student, self.quant)
            (lam * damp).backward()
            parts_sum["dampen"] = float(damp.detach())
        signs = binary_signs(self.student, self.quant)
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.freezer is not None:  # before counting: a frozen weight's bit stays
            parts_sum["frozen"] = self.freezer.step(signs)
        flips = flip_fraction(signs, binary_signs(self.student, self.quant))
        if flips is not None:
            parts_sum["flips"] = flips
        rec = {"step": self.step, "loss": total, "lr": lr_at(self.step, cfg), **parts_sum}
        self.step += 1
        self.history.append(rec)
        return rec

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Distillation loss and the student's next-token cross-entropy on the held-out
        windows (fixed), in eval mode (static ranges frozen)."""
        self.student.eval()
        ids = held_out(self.streams["valid"], self.cfg.eval_windows, self.cfg.seq_len)
        losses, ces = [], []
        for i in range(0, len(ids), 8):
            x = ids[i:i + 8]
            loss, _ = self.micro_loss(x)
            logits = self.student(input_ids=x, use_cache=False).logits
            ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                   x[:, 1:].flatten())
            losses.append(float(loss))
            ces.append(float(ce))
        rec = {"step": self.step, "tokens": self.tokens,
               "loss": sum(losses) / len(losses), "ce": sum(ces) / len(ces)}
        self.evals.append(rec)
        return rec

    def fit(self, progress: bool = True) -> None:
        """Train from ``self.step`` to ``cfg.steps``, checkpointing; Ctrl-C stops between
        steps (KeyboardInterrupt propagates; the last checkpoint stays)."""
        cfg = self.cfg
        bar = progress_bar(total=cfg.steps, initial=self.step, desc="training", unit="step",
                           progress=progress, dynamic_ncols=True)
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                rec = self.train_step()
                dt = time.perf_counter() - t0
                self.seconds += dt
                bar.update(1)
                post = {"loss": f"{rec['loss']:.4f}",
                        "tok_s": f"{cfg.batch_size * cfg.seq_len * cfg.accumulate / dt:.0f}"}
                if "flips" in rec:
                    post["flips"] = f"{rec['flips']:.1e}"
                if "frozen" in rec:
                    post["frozen"] = f"{rec['frozen']:.1e}"
                bar.set_postfix(post)
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    ev = self.evaluate()
                    bar.write(f"step {self.step}: held-out loss {ev['loss']:.4f}, "
                              f"ce {ev['ce']:.4f}")
                if cfg.ckpt_every and (self.step % cfg.ckpt_every == 0 or self.step == cfg.steps):
                    self.save()
        finally:
            bar.close()

    def export(self, out, *, force: bool = False):
        """The trained student, frozen by the recipe and lowered to int8 (the artifact
        must carry the trained weights: a self-contained int8 artifact; ops with no
        integer kernel stay simulated, recorded): a QuantizedModel, saved to ``out``
        when given. Its source model is the teacher's name, its config the student's."""
        if self.recipe.settings.lower not in (None, "int8"):
            raise ModelError(f"{self.recipe.source}: `set lower = "
                             f"{self.recipe.settings.lower}`: a trained artifact is lowered "
                             "to int8 (it carries its trained weights)")
        detach(self.student, self.quant)
        self.student.eval().requires_grad_(False)
        calib = batch(self.streams["train"], 0, self.cfg.seed + CALIB_SEED, 32, self.cfg.seq_len)
        qm = compile(self.student, self.recipe, calib=calib, tokenizer=self.tokenizer,
                     lower="int8", reduce=False, progress=False, fallback="simulate")
        # the artifact names the teacher as its source model: `qdsl eval` compares with it
        qm.source_id = self.model_id
        if out is not None:
            qm.save(out, force=force)
        return qm


def train(recipe, model, out=None, *, run=None, resume: bool = False,
          config: TrainConfig = TrainConfig(), progress: bool = True,
          force: bool = False, init=None) -> TrainResult:
    """Train the student ``recipe`` describes against ``model`` and write the artifact
    ``out`` (None: train and checkpoint only). ``run``: the checkpoint directory
    (default ``OUT.run``). ``init``: an artifact whose float student weights the
    student starts from (XTC's step 2 on a trained step-1 student; ``init.py``)."""
    if run is None:
        if out is None:
            raise ModelError("train: give an output artifact or a run directory")
        run = Path(str(out).rstrip("/") + ".run")
    if resume and checkpoint.latest(Path(run)) is None:  # before loading or tokenising
        raise ModelError(f"--resume: no checkpoint in {run} (expected {Path(run) / 'ckpt'})")
    if not resume and checkpoint.latest(Path(run)) is not None:
        raise ModelError(f"{run} holds a checkpoint: continue it with --resume, or "
                         f"give another --run directory")
    trainer = Trainer(recipe, model, Path(run), config, init=init)
    if resume:
        trainer.resume()
    trainer.fit(progress=progress)
    if not trainer.evals or trainer.evals[-1]["step"] != trainer.step:
        trainer.evaluate()
        trainer.save()
    if out is not None:
        trainer.export(out, force=force)
    return TrainResult(Path(out) if out is not None else None, trainer.run, trainer.step,
                       trainer.tokens, trainer.seconds, trainer.history, trainer.evals,
                       trainer.layer_map)
