"""Resumable training state: ``RUN/ckpt/`` = ``model.safetensors`` (the student's
trainable float parameters and the activation quantizers' running ranges),
``optim.safetensors`` (AdamW's moments and step counts, one entry per parameter,
keyed by parameter name), ``extra.safetensors`` (other training state, e.g. the
oscillation freezer's averages; when there is any), ``rng.safetensors`` (torch's CPU
generator state) and ``state.json`` (step, tokens seen, elapsed time, the loss history, the run's
settings). No pickle.

The directory is written whole under a temporary name and swapped in by renames
(``ckpt.tmp`` -> ``ckpt``, the previous one kept as ``ckpt.old`` until the swap is
done), so an interrupted save (Ctrl-C, a kill) leaves the last complete checkpoint;
``load`` falls back to ``ckpt.old`` when ``ckpt`` is missing.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import ModelError


def _params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return dict(model.named_parameters())  # tied weights once


def save(run: Path, model, acts: torch.nn.Module, opt: torch.optim.Optimizer,
         state: dict, extra: dict[str, torch.Tensor] | None = None) -> None:
    tmp, cur, old = run / "ckpt.tmp", run / "ckpt", run / "ckpt.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    params = _params(model)
    tensors = {f"param.{k}": p.detach().contiguous().clone() for k, p in params.items()}
    tensors.update({f"act.{k}": v.detach().clone() for k, v in acts.state_dict().items()})
    save_file(tensors, str(tmp / "model.safetensors"))
    optim = {}
    for k, p in params.items():
        for name, v in opt.state.get(p, {}).items():
            optim[f"{k}::{name}"] = (v.detach().clone() if torch.is_tensor(v)
                                     else torch.tensor(v)).contiguous()
    save_file(optim or {"empty": torch.zeros(0)}, str(tmp / "optim.safetensors"))
    save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    if extra:
        save_file({k: v.detach().contiguous().clone() for k, v in extra.items()},
                  str(tmp / "extra.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
    for f in tmp.iterdir():  # on disk before the swap
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if old.exists():
        shutil.rmtree(old)
    if cur.exists():
        os.rename(cur, old)
    os.rename(tmp, cur)
    shutil.rmtree(old, ignore_errors=True)


def latest(run: Path) -> Path | None:
    for d in (run / "ckpt", run / "ckpt.old"):
        if (d / "state.json").is_file():
            return d
    return None


def load(run: Path, model, acts: torch.nn.Module, opt: torch.optim.Optimizer,
         extra: dict | None = None) -> dict:
    """Restore everything ``save`` wrote; the saved state dict (step, history ...).
    ``extra`` (a dict) receives the tensors saved as ``extra`` (empty when none were)."""
    d = latest(run)
    if d is None:
        raise ModelError(f"--resume: no checkpoint in {run} (expected {run / 'ckpt'})")
    try:
        tensors = load_file(str(d / "model.safetensors"))
        optim = load_file(str(d / "optim.safetensors"))
        rng = load_file(str(d / "rng.safetensors"))["torch"]
        state = json.loads((d / "state.json").read_text(encoding="utf-8"))
        more = (load_file(str(d / "extra.safetensors"))
                if (d / "extra.safetensors").is_file() else {})
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"--resume: unreadable checkpoint {d}: {e}") from e
    params = _params(model)
    missing = [k for k in params if f"param.{k}" not in tensors]
    if missing:
        raise ModelError(f"--resume: checkpoint {d} does not match this student "
                         f"(no {missing[0]}): was it written for another recipe or model?")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[f"param.{k}"])
    acts.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("act.")})
    for k, p in params.items():
        st = {key.split("::", 1)[1]: v for key, v in optim.items()
              if key.split("::", 1)[0] == k}
        if st:
            opt.state[p] = st
    torch.set_rng_state(rng)
    if extra is not None:
        extra.update(more)
    return state
