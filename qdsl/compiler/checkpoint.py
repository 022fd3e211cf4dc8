"""A model read lazily from its safetensors checkpoint (``qdsl compile --stream``).

    config.json --meta params, real buffers--> skeleton --uninitialised CPU params--> capture
    checkpoint (safe_open, one tensor at a time) --> the parameters a block needs, float32

The skeleton is built under ``accelerate.init_empty_weights(include_buffers=False)``:
parameters on ``meta``, buffers (rotary frequencies, causal masks) computed on the CPU
exactly as ``from_pretrained`` computes them. ``torch.export`` cannot trace meta
parameters against the CPU key/value cache, so each parameter is then given
uninitialised CPU memory that nothing writes or reads (the pages are never resident;
``qdsl.compiler.lowered`` does the same); the streaming driver swaps them for meta
tensors right after capture. ``Checkpoint.tensor`` reads one parameter from the
checkpoint with plain chunked file reads (``read_tensor``: the file is never mapped),
cast to float32 as ``load_model`` (``dtype=torch.float32``) casts it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from ..errors import ModelError
from ..models import zoo
from ..models.zoo import checkpoint_architecture


class Checkpoint:
    """The source model's state names -> tensors, read on demand.

    ``model``: the skeleton (parameters uninitialised, buffers real); ``files``:
    checkpoint key -> safetensors file; ``keys``: state name (``model.state_dict()``)
    -> checkpoint key, for every parameter (tied names share one key)."""

    def __init__(self, name: str, path: Path, model: torch.nn.Module, tokenizer):
        self.name, self.path, self.model, self.tokenizer = name, path, model, tokenizer
        self.files = _checkpoint_files(path)
        self.params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        self.keys = _state_keys(model, self.files, path)

    def tensor(self, state_name: str) -> torch.Tensor:
        """The float32 value of parameter or buffer ``state_name`` (a fresh tensor)."""
        if state_name not in self.keys:   # a buffer: the skeleton computed it
            return _get(self.model, state_name).detach()
        key = self.keys[state_name]
        return read_tensor(self.files[key], key)

    def source_hash(self) -> str:
        """``qdsl.artifact.store.module_hash`` of the loaded model, one tensor at a time."""
        h = hashlib.sha256()
        for name, t in sorted(self.model.state_dict(keep_vars=True).items()):
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            value = self.tensor(name)
            if tuple(value.shape) != tuple(t.shape):
                raise ModelError(f"{self.path}: checkpoint tensor {self.keys.get(name, name)} "
                                 f"has shape {tuple(value.shape)}, the model's {name} "
                                 f"{tuple(t.shape)}")
            # the array itself (a buffer): .tobytes() would copy the whole tensor again
            h.update(value.contiguous().view(-1).view(torch.uint8).numpy())
            del value
        return h.hexdigest()[:20]

    def float_bytes(self) -> int:
        """Bytes of the model's parameters in float32 (tied ones once)."""
        return sum(p.numel() * 4 for p in self.model.parameters())


def open_checkpoint(name_or_path: str) -> Checkpoint:
    """Resolve a model (short name, directory, hub id) and build its skeleton; ModelError
    for a checkpoint that is not safetensors or a model that cannot be built."""
    try:
        from accelerate import init_empty_weights
    except ImportError:
        raise ModelError("compile --stream builds the model skeleton with accelerate: "
                         "pip install 'qdsl[models]' (or accelerate)") from None

    r = zoo.resolve_model(name_or_path)
    arch = checkpoint_architecture(r.path)
    auto = AutoModelForCausalLM if arch.causal else AutoModel
    try:
        config = AutoConfig.from_pretrained(r.path, local_files_only=True)
        with init_empty_weights(include_buffers=False):
            model = auto.from_config(config, attn_implementation="eager", dtype=torch.float32)
        model.tie_weights()   # as from_pretrained (outside the context: it re-registers)
        tok = AutoTokenizer.from_pretrained(r.path)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise ModelError(f"cannot build {r.name} from {r.path}: {str(e)[:500]}") from e
    _empty_params(model)
    return Checkpoint(str(name_or_path), Path(r.path), model.eval(), tok)


def _empty_params(model: torch.nn.Module) -> None:
    """Meta parameters -> uninitialised CPU parameters (never touched), ties kept."""
    memo: dict[int, torch.nn.Parameter] = {}
    for mod in model.modules():
        for k, p in mod._parameters.items():
            if p is None:
                continue
            if id(p) not in memo:
                memo[id(p)] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype),
                                                 requires_grad=False)
            mod._parameters[k] = memo[id(p)]


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
CHUNK = 16 << 20   # bytes read at a time


def read_tensor(file: Path, key: str) -> torch.Tensor:
    """Tensor ``key`` of a safetensors file, floating point cast to float32, read with
    plain file reads into the result: no mapping of the file (whose touched pages
    would count as resident) and no whole copy in the file's dtype beside the float32
    one. A tensor stored in its result's dtype (a float32 checkpoint) is read straight
    into the result; one to cast goes through one ``CHUNK``-byte buffer, reused."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        info = header.get(key)
        if info is None or info.get("dtype") not in _DTYPES:
            raise ModelError(f"{file}: no readable tensor {key!r} in its header")
        dtype, shape = _DTYPES[info["dtype"]], info["shape"]
        start, end = info["data_offsets"]
        out_dtype = torch.float32 if dtype.is_floating_point else dtype
        out = torch.empty(shape, dtype=out_dtype)
        flat = out.view(-1)
        size = torch.empty((), dtype=dtype).element_size()
        if (end - start) != flat.numel() * size:
            raise ModelError(f"{file}: tensor {key!r} has {end - start} bytes for shape {shape}")
        f.seek(8 + n + start)
        if dtype == out_dtype:   # the bytes are the result's: read them in place
            raw = memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")
            for i in range(0, len(raw), CHUNK):
                part = raw[i:i + CHUNK]
                if f.readinto(part) != len(part):
                    raise ModelError(f"{file}: tensor {key!r} is truncated")
            return out
        step = max(1, CHUNK // size)
        buf = bytearray(min(step, flat.numel()) * size)
        for i in range(0, flat.numel(), step):
            count = min(step, flat.numel() - i)
            part = memoryview(buf)[:count * size]
            if f.readinto(part) != len(part):
                raise ModelError(f"{file}: tensor {key!r} is truncated")
            flat[i:i + count] = torch.frombuffer(buf, dtype=dtype, count=count)
        return out


def _checkpoint_files(path: Path) -> dict[str, Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelError(f"{index}: not a readable safetensors index "
                             f"({type(e).__name__})") from None
        return {k: path / f for k, f in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise ModelError(f"{path}: compile --stream reads safetensors checkpoints "
                         "(model.safetensors or model.safetensors.index.json); found neither")
    with safe_open(str(single), framework="pt") as f:
        return {k: single for k in f.keys()}


def _state_keys(model: torch.nn.Module, files: dict[str, Path], path: Path) -> dict[str, str]:
    """Each parameter's checkpoint key: its own name, with or without the base model's
    prefix, or the key of a parameter it is tied to; ModelError naming one that has none."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    groups: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(n)
    keys: dict[str, str] = {}
    for names in groups.values():
        found = None
        for n in names:
            for cand in (n, n.removeprefix(prefix + "."), f"{prefix}.{n}"):
                if cand in files:
                    found = cand
                    break
            if found:
                break
        if found is None:
            raise ModelError(f"{path}: the checkpoint has no tensor for {names[0]} (looked for "
                             f"{names[0]!r} with and without the prefix {prefix!r}); "
                             "compile it without --stream")
        keys.update({n: found for n in names})
    return keys


def _get(model: torch.nn.Module, name: str) -> torch.Tensor:
    obj = model
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj
