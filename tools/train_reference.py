"""Train the reference model ``stdlib-gpt2``: a small GPT-2 (the CodeGPT
architecture) in full precision, with a byte-level BPE tokenizer, on the
Python standard library's own source (split: ``qdsl.models.stdlib``).

Resumable background job::

    nohup nice -n 10 .venv/bin/python tools/train_reference.py --run runs/stdlib-gpt2 &
    .venv/bin/python tools/train_reference.py --run runs/stdlib-gpt2 --resume      # go on
    .venv/bin/python tools/train_reference.py --run runs/stdlib-gpt2 --export models/stdlib-gpt2

Every ``--ckpt-minutes`` the run directory gets ``ckpt/`` (model.safetensors,
optim.safetensors, state.json), replaced atomically (temp dir + rename). No
pickle: optimizer state is saved with safetensors too. The batch of step s is
drawn from ``numpy.random.default_rng([seed, s])``, so a resumed run sees the
same data as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file, save_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qdsl.models.stdlib import stdlib_dir, stdlib_files  # noqa: E402

log = logging.getLogger("train_reference")
EOS = "<|endoftext|>"


def train_tokenizer(files: list[Path], vocab: int, out: Path):
    from tokenizers import ByteLevelBPETokenizer
    tok = ByteLevelBPETokenizer(add_prefix_space=False)
    tok.train([str(f) for f in files], vocab_size=vocab, min_frequency=2,
              special_tokens=[EOS], show_progress=False)
    tok.save(str(out))


def encode_files(tok_path: Path, files: list[Path]) -> np.ndarray:
    """All files' tokens, each file followed by EOS, as one uint16 stream."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tok_path))
    eos = tok.token_to_id(EOS)
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
    return np.asarray(ids, dtype=np.uint16)


def prepare(run: Path, args) -> dict[str, np.ndarray]:
    tok_path = run / "tokenizer.json"
    if not tok_path.exists():
        t0 = time.time()
        train_tokenizer(stdlib_files("train"), args.vocab, tok_path)
        log.info("tokenizer trained in %.1fs", time.time() - t0)
    data = {}
    for split in ("train", "valid"):
        p = run / f"{split}.npy"
        if not p.exists():
            np.save(p, encode_files(tok_path, stdlib_files(split)))
        data[split] = np.load(p, allow_pickle=False)
        log.info("%s: %d tokens", split, len(data[split]))
    return data


def build_model(args, vocab_size: int, eos_id: int):
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=args.ctx, n_embd=args.d,
                     n_layer=args.layers, n_head=args.heads, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eos_id,
                     eos_token_id=eos_id)
    torch.manual_seed(args.seed)
    return GPT2LMHeadModel(cfg)


def batch(data: np.ndarray, step: int, args) -> torch.Tensor:
    rng = np.random.default_rng([args.seed, step])
    starts = rng.integers(0, len(data) - args.ctx - 1, args.batch)
    return torch.from_numpy(np.stack([data[s:s + args.ctx + 1] for s in starts]).astype(np.int64))


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


@torch.no_grad()
def valid_loss(model, data: np.ndarray, args, n: int = 64) -> float:
    """Mean loss over n fixed, non-overlapping windows of the valid split."""
    model.eval()
    stride = max(args.ctx + 1, (len(data) - args.ctx - 1) // n)
    windows = [data[i:i + args.ctx + 1] for i in range(0, stride * n, stride)]
    losses = []
    for i in range(0, len(windows), 16):
        x = torch.from_numpy(np.stack(windows[i:i + 16]).astype(np.int64))
        losses.append(model(input_ids=x[:, :-1], labels=x[:, :-1]).loss.item())
    model.train()
    return float(np.mean(losses))


def save_ckpt(run: Path, model, opt, state: dict) -> None:
    tmp = run / "ckpt.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    flat = {}
    for i, p in enumerate(model.parameters()):
        for k, v in opt.state.get(p, {}).items():
            flat[f"{i}.{k}"] = v.detach().reshape(v.shape) if torch.is_tensor(v) else torch.tensor(v)
    save_file(flat, str(tmp / "optim.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    old = run / "ckpt.old"
    shutil.rmtree(old, ignore_errors=True)
    if (run / "ckpt").exists():
        os.rename(run / "ckpt", old)
    os.rename(tmp, run / "ckpt")
    shutil.rmtree(old, ignore_errors=True)


def load_ckpt(run: Path, model, opt) -> dict:
    from safetensors.torch import load_model
    load_model(model, str(run / "ckpt" / "model.safetensors"))
    flat = load_file(str(run / "ckpt" / "optim.safetensors"))
    for i, p in enumerate(model.parameters()):
        st = {k.split(".", 1)[1]: v for k, v in flat.items() if k.split(".", 1)[0] == str(i)}
        if st:
            opt.state[p] = st
    return json.loads((run / "ckpt" / "state.json").read_text())


def train(args) -> None:
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    cfg_path = run / "args.json"
    if args.resume:
        saved = json.loads(cfg_path.read_text())
        for k in ("layers", "d", "heads", "ctx", "vocab", "batch", "lr", "warmup", "seed"):
            setattr(args, k, saved[k])
        args.steps = args.steps or saved["steps"]
    elif (run / "ckpt").exists():
        raise SystemExit(f"{run}/ckpt exists: pass --resume, or choose another --run")
    cfg_path.write_text(json.dumps(vars(args), indent=1))
    torch.set_num_threads(args.threads)
    data = prepare(run, args)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(run / "tokenizer.json"))
    model = build_model(args, tok.get_vocab_size(), tok.token_to_id(EOS))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    state = {"step": 0, "tokens_seen": 0, "train_seconds": 0.0, "history": []}
    if args.resume:
        state = load_ckpt(run, model, opt)
    log.info("params %.2fM, start at step %d/%d", sum(p.numel() for p in model.parameters()) / 1e6,
             state["step"], args.steps)
    model.train()
    t_last, t_ckpt, ema = time.time(), time.time(), None
    deadline = time.time() + args.max_minutes * 60 if args.max_minutes else None
    while state["step"] < args.steps:
        step = state["step"]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        x = batch(data["train"], step, args)
        loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        now = time.time()
        state["train_seconds"] += now - t_last
        t_last = now
        state["step"] += 1
        state["tokens_seen"] += args.batch * args.ctx
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if state["step"] % 25 == 0:
            log.info("step %d loss %.3f lr %.2e %.0f tok/s", state["step"], ema, lr_at(step, args),
                     state["tokens_seen"] / state["train_seconds"])
        done = state["step"] >= args.steps or (deadline and now > deadline)
        if done or now - t_ckpt > args.ckpt_minutes * 60:
            v = valid_loss(model, data["valid"], args)
            state["history"].append({"step": state["step"], "tokens": state["tokens_seen"],
                                     "train_loss": round(ema, 4), "valid_loss": round(v, 4),
                                     "seconds": round(state["train_seconds"], 1)})
            save_ckpt(run, model, opt, state)
            log.info("checkpoint at step %d: valid loss %.3f", state["step"], v)
            t_ckpt = t_last = time.time()
            if done:
                break


def export(args) -> None:
    """Write the checkpoint as a transformers model directory (+ tokenizer)."""
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast
    run, out = Path(args.run), Path(args.export)
    saved = json.loads((run / "args.json").read_text())
    for k in ("layers", "d", "heads", "ctx", "vocab", "seed"):
        setattr(args, k, saved[k])
    tok = PreTrainedTokenizerFast(tokenizer_file=str(run / "tokenizer.json"),
                                  bos_token=EOS, eos_token=EOS, unk_token=EOS,
                                  model_max_length=args.ctx)
    model = build_model(args, len(tok), tok.convert_tokens_to_ids(EOS))
    from safetensors.torch import load_model
    load_model(model, str(run / "ckpt" / "model.safetensors"))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.copy(run / "ckpt" / "state.json", tmp / "training_state.json")
    if (out / "MODEL_CARD.md").exists():
        shutil.copy(out / "MODEL_CARD.md", tmp / "MODEL_CARD.md")
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    log.info("exported to %s", out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/stdlib-gpt2", help="run directory (checkpoints, data)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--export", metavar="DIR", help="export the checkpoint to DIR and exit")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=0, help="total optimizer steps (schedule length)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt-minutes", type=float, default=5.0)
    ap.add_argument("--max-minutes", type=float, default=0.0, help="stop (and checkpoint) after this")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log.info("stdlib at %s", stdlib_dir())
    if args.export:
        export(args)
    else:
        if not args.resume and args.steps <= 0:
            raise SystemExit("--steps is required for a new run")
        train(args)


if __name__ == "__main__":
    main()
