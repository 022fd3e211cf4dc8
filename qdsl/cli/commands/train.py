"""qdsl train RECIPE --model TEACHER [--data DIR] -o OUT [--resume]."""

from __future__ import annotations

import sys

from ...atomic import ARTIFACT, output_dir as claim_output
from ..args import (add_artifact_out, add_recipe_model, nonneg_float, nonneg_int, positive_float,
                    positive_int, seed_int)
from ..names import COMMANDS


def register(sub) -> None:
    p = sub.add_parser(
        "train", help=COMMANDS["train"],
        description="Quantization-aware distillation (XTC, de Moor et al. 2023): the student "
                    "RECIPE describes (its `set student.blocks` layer reduction, its weight and "
                    "activation quantizers under a straight-through estimator) is trained "
                    "against the float TEACHER with XTC's loss (soft cross-entropy on logits + "
                    "MSE on hidden states and attention maps; weights by `set train.logits|hidden|attn`; "
                    "`set train.dampen = W` adds oscillation dampening, `set train.freeze = F` "
                    "freezes 1-bit weights that flip more often than F per step, `set "
                    "train.scales = learned` trains the 1-bit scales), AdamW, linear "
                    "warm-up and decay (`set train.lr|warmup` or --lr / --warmup); each step "
                    "records its loss parts and, for 1-bit weights, the fraction whose sign "
                    "flipped. "
                    "Checkpoints (safetensors + JSON) go to RUN every --ckpt-every steps; "
                    "--resume continues exactly; Ctrl-C keeps the last checkpoint. The trained "
                    "weights are frozen by the recipe and lowered to int8 (packed 1-bit weights; "
                    "a self-contained artifact) into the artifact OUT that `qdsl eval`, `qdsl bench` and "
                    "qdsl.load() read.")
    add_recipe_model(p, "the teacher: short name, checkpoint dir, hub id")
    p.add_argument("--data", default="stdlib",
                   help="training code: a directory of .py files (5%% held out by path hash) "
                        "or 'stdlib' (the reference model's train / valid split; default)")
    p.add_argument("--run", metavar="DIR", help="checkpoint directory (default OUT.run)")
    p.add_argument("--resume", action="store_true", help="continue from RUN's last checkpoint")
    p.add_argument("--init", metavar="ARTIFACT",
                   help="start the student from this trained float student's weights (XTC's "
                        "two steps: train recipes/demoor/2l.qrec first, then 1w8a2l.qrec "
                        "--init that artifact; same teacher and student.blocks)")
    p.add_argument("--steps", type=positive_int, default=200, help="optimizer steps (default 200)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="windows per micro-batch (8)")
    p.add_argument("--seq-len", type=positive_int, default=128, help="tokens per window (128)")
    p.add_argument("--accumulate", type=positive_int, default=1,
                   help="micro-batches per optimizer step (gradient accumulation; 1)")
    p.add_argument("--lr", type=positive_float,
                   help="peak learning rate (overrides the recipe's `set train.lr`; default "
                        "5e-4, de Moor's; XTC used 5e-5)")
    p.add_argument("--warmup", type=nonneg_float,
                   help="warm-up fraction of the steps (overrides `set train.warmup`; "
                        "default 0.2, de Moor's)")
    p.add_argument("--seed", type=seed_int, default=0, help="data order seed (0)")
    p.add_argument("--ckpt-every", type=nonneg_int, default=50, help="steps between checkpoints (50)")
    p.add_argument("--eval-every", type=nonneg_int, default=0,
                   help="steps between held-out evaluations (0: at the end only)")
    p.add_argument("--max-tokens", type=positive_int, default=4_000_000,
                   help="training tokens tokenised and sampled from (4,000,000)")
    add_artifact_out(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ...artifact.store import artifact_size
    from ...train.loop import TrainConfig, train

    if args.warmup is not None and args.warmup > 1:
        print("error: --warmup is a fraction of the steps, 0 to 1", file=sys.stderr)
        return 2
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                      accumulate=args.accumulate, lr=args.lr, warmup=args.warmup,
                      seed=args.seed, ckpt_every=args.ckpt_every, eval_every=args.eval_every,
                      data=args.data, max_tokens=args.max_tokens)
    with claim_output(args.out, ARTIFACT, force=args.force):  # refused now, not after training
        try:
            result = train(args.recipe, args.model, args.out, run=args.run,
                                  resume=args.resume, config=cfg, force=args.force,
                           init=args.init)
        except KeyboardInterrupt:
            print("training interrupted: the last checkpoint is kept; continue with the same "
                  "command and --resume", file=sys.stderr)
            raise
    ev = result.evals[-1] if result.evals else {}
    print(f"trained {result.steps} steps, {result.tokens:,} tokens, {result.seconds:.0f} s "
          f"(held-out loss {ev.get('loss', float('nan')):.4f}, ce {ev.get('ce', float('nan')):.4f}); "
          f"checkpoints in {result.run}")
    print(f"wrote {result.out} ({artifact_size(result.out) / 2**20:.2f} MB)")
    return 0
