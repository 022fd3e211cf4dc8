"""Checks on an artifact read from disk: nothing in it is trusted until it passed here.

    files        every file qdsl reads is a regular file (no symlink, device, FIFO), is
                 present, and (verify) has the size and sha256 recorded at save
    JSON         qdsl_artifact.json and plan.json against the schemas below: types,
                 required keys, enums, ranges; a message names the file and key path
    recipe       recipe.qrec parses, and its rules and hash agree with the recorded ones
    safetensors  the header is read and checked against the file size before any tensor
                 is (a pickle, a truncated file, an offset past the end: refused without
                 allocating); stored float tensors are finite

The hashes detect damage (a flipped byte, a truncated copy), not tampering: whoever
can edit a file can edit the marker's hash of it too. The schema checks, the
cross-checks and the size checks still apply to such an artifact.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any, Callable

from ..errors import ArtifactError, RecipeError

CHUNK = 1 << 20                 # sha256 is computed over 1 MiB reads
MAX_JSON_BYTES = 256 << 20      # plan.json of a 1000-layer model is a few MB
MAX_ST_HEADER = 100 << 20       # the safetensors library's own limit
MAX_INT = 1 << 31
SHA256 = re.compile(r"[0-9a-f]{64}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_records(d: Path, skip: str) -> dict[str, dict[str, Any]]:
    """{relative posix path: {"sha256", "size"}} of every file under ``d`` but ``skip``."""
    out = {}
    for f in sorted(d.rglob("*")):
        rel = f.relative_to(d).as_posix()
        if f.is_file() and rel != skip:
            out[rel] = {"sha256": sha256_file(f), "size": f.stat().st_size}
    return out


# --------------------------------------------------------------------------- files


def regular_file(d: Path, rel: str) -> os.stat_result:
    """``d/rel``'s stat if it is a regular file (not a link, device, FIFO, directory):
    decided from lstat, before anything opens it; else an ArtifactError naming it."""
    p = d / rel
    parent = p.parent
    while parent != d:                      # model/ itself must not be a link either
        try:
            if not stat.S_ISDIR(os.lstat(parent).st_mode):
                raise ArtifactError(f"artifact {d}: {parent.relative_to(d)} is not a directory")
        except FileNotFoundError:
            raise ArtifactError(f"artifact {d}: {rel} is missing") from None
        parent = parent.parent
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        raise ArtifactError(f"artifact {d}: {rel} is missing") from None
    if stat.S_ISLNK(st.st_mode):
        raise ArtifactError(f"artifact {d}: {rel} is a symbolic link; artifact files must "
                            "be regular files (copy the file in)")
    if not stat.S_ISREG(st.st_mode):
        raise ArtifactError(f"artifact {d}: {rel} is not a regular file")
    return st


def verify_files(d: Path, recorded: dict[str, dict], reads: list[str]) -> None:
    """Every recorded file has its recorded size and sha256; every file qdsl reads
    (``reads``, and anything under model/) is recorded."""
    for rel in reads:
        if rel not in recorded:
            raise ArtifactError(f"artifact {d}: {rel} is not recorded in qdsl_artifact.json "
                                "(added after the artifact was written?)")
    for rel, rec in recorded.items():
        st = regular_file(d, rel)
        if st.st_size != rec["size"] or sha256_file(d / rel) != rec["sha256"]:
            raise ArtifactError(
                f"artifact {d}: {rel} does not match its recorded hash (the file was changed "
                "or damaged); recompile, or pass --no-verify to load it anyway")


def read_json(d: Path, rel: str) -> Any:
    """A JSON file of the artifact: regular, bounded, UTF-8, strict (no NaN / Infinity)."""
    st = regular_file(d, rel)
    if st.st_size > MAX_JSON_BYTES:
        raise ArtifactError(f"artifact {d}: {rel} is {st.st_size} bytes, more than any "
                            f"artifact writes ({MAX_JSON_BYTES})")

    def no_constants(name):
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads((d / rel).read_bytes().decode("utf-8"), parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ArtifactError(f"artifact {d}: {rel} is not valid JSON: "
                            f"{str(e)[:200] or type(e).__name__}") from None


def model_dir_files(d: Path) -> list[str]:
    """Files under model/ (each must be a regular file: a tokenizer reads them all)."""
    if not (d / "model").exists() and not (d / "model").is_symlink():
        return []
    regular_file(d, "model/config.json")
    out = []
    for root, dirs, files in os.walk(d / "model"):
        for name in dirs + files:
            rel = (Path(root) / name).relative_to(d).as_posix()
            if name in files:
                regular_file(d, rel)
                out.append(rel)
            elif os.path.islink(Path(root) / name):
                raise ArtifactError(f"artifact {d}: {rel} is a symbolic link")
    return sorted(out)


# --------------------------------------------------------------------------- schema
# A schema is a function (value, path) -> None raising Invalid; the builders below
# make them. Paths read like `entries[3].weight.bits`.


class Invalid(Exception):
    def __init__(self, path: str, message: str):
        super().__init__(f"{path} {message}" if path else message)


Check = Callable[[Any, str], None]


def _show(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, float) or math.isfinite(v) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _key(path: str, k: str) -> str:
    return f"{path}.{k}" if path and re.fullmatch(r"[A-Za-z_][\w]*", k) else \
        f"{path}[{json.dumps(k)}]" if path else k


def Str(enum: tuple | None = None, pattern: str | None = None, max_len: int = 4096) -> Check:
    def check(v, p):
        if not isinstance(v, str):
            raise Invalid(p, f"must be a string, got {_show(v)}")
        if enum is not None and v not in enum:
            raise Invalid(p, f"must be one of {', '.join(map(str, enum))}; got {_show(v)}")
        if len(v) > max_len:
            raise Invalid(p, f"is longer than {max_len} characters")
        if pattern is not None and not re.fullmatch(pattern, v):
            raise Invalid(p, f"is malformed: {_show(v)}")
    return check


def Int(lo: int, hi: int, also: tuple = ()) -> Check:
    def check(v, p):
        if not isinstance(v, int) or isinstance(v, bool):
            raise Invalid(p, f"must be an integer, got {_show(v)}")
        if not lo <= v <= hi and v not in also:
            extra = "".join(f" or {a}" for a in also)
            raise Invalid(p, f"must be {lo}..{hi}{extra}, got {_show(v)}")
    return check


def Num(lo: float, hi: float) -> Check:
    def check(v, p):
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise Invalid(p, f"must be a number, got {_show(v)}")
        if not lo <= v <= hi:
            raise Invalid(p, f"must be in [{lo}, {hi}], got {_show(v)}")
    return check


def Bool(v, p):
    if not isinstance(v, bool):
        raise Invalid(p, f"must be true or false, got {_show(v)}")


def Opt(inner: Check) -> Check:
    def check(v, p):
        if v is not None:
            inner(v, p)
    return check


def Obj(required: dict[str, Check], optional: dict[str, Check] | None = None) -> Check:
    optional = optional or {}

    def check(v, p):
        if not isinstance(v, dict):
            raise Invalid(p, f"must be an object, got {_show(v)}")
        for k in required:
            if k not in v:
                raise Invalid(p, f"has no key {json.dumps(k)}") if p else \
                    Invalid("", f"missing key {json.dumps(k)}")
        for k, x in v.items():
            sub = required.get(k) or optional.get(k)
            if sub is None:
                raise Invalid(p, f"has an unknown key {_show(k)}") if p else \
                    Invalid("", f"unknown key {_show(k)}")
            sub(x, _key(p, k))
    return check


def Map(value: Check, key: Check = Str()) -> Check:
    def check(v, p):
        if not isinstance(v, dict):
            raise Invalid(p, f"must be an object, got {_show(v)}")
        for k, x in v.items():
            key(k, _key(p, k))
            value(x, _key(p, k))
    return check


def List(item: Check, min_len: int = 0, max_len: int = 1 << 20) -> Check:
    def check(v, p):
        if not isinstance(v, list):
            raise Invalid(p, f"must be a list, got {_show(v)}")
        if not min_len <= len(v) <= max_len:
            raise Invalid(p, f"must have {min_len}..{max_len} items, got {len(v)}")
        for i, x in enumerate(v):
            item(x, f"{p}[{i}]")
    return check


def Pair(first: Check, second: Check) -> Check:
    def check(v, p):
        if not isinstance(v, list) or len(v) != 2:
            raise Invalid(p, f"must be a list of two items, got {_show(v)}")
        first(v[0], f"{p}[0]")
        second(v[1], f"{p}[1]")
    return check


def Tagged(tag: str, variants: dict[str, dict[str, Check]]) -> Check:
    """An object whose ``tag`` key picks which other keys it has."""
    which = Str(enum=tuple(variants))

    def check(v, p):
        if not isinstance(v, dict):
            raise Invalid(p, f"must be an object, got {_show(v)}")
        which(v.get(tag), _key(p, tag))
        Obj({tag: which, **variants[v[tag]]})(v, p)
    return check


# --------------------------------------------------------------------------- the schemas

NAME = Str(max_len=1024)
SIZE = Int(1, 1 << 20)
FLOAT_DTYPE = Str(enum=("fp32", "fp16", "bf16"))
GRANULARITY = Tagged("name", {"per_tensor": {}, "per_channel": {}, "per_token": {},
                              "per_group": {"k": SIZE, "permute": Bool},
                              "group": {"size": SIZE}})
OBSERVER = Tagged("name", {"minmax": {}, "current_minmax": {},
                           "running_minmax": {"momentum": Num(0.0, 0.999999)},
                           "mse": {"candidates": SIZE}, "percentile": {"p": Num(1e-9, 100.0)}})
TENSOR_SPEC = Obj({"kind": Str(enum=("weight", "activation")), "bits": Opt(Int(1, 16)),
                   "float_dtype": FLOAT_DTYPE, "symmetric": Bool, "granularity": GRANULARITY,
                   "observer": OBSERVER, "dynamic": Bool})
PATCH = Obj({"bits": Opt(Int(1, 16, also=(32,))), "float_dtype": Opt(FLOAT_DTYPE),
             "symmetric": Opt(Bool), "granularity": Opt(GRANULARITY),
             "observer": Opt(OBSERVER), "dynamic": Opt(Bool)})
COUNT = Opt(Int(0, MAX_INT))
SETTINGS = Obj({"calib_samples": COUNT, "calib_seq_len": COUNT, "calib_seed": Opt(Int(-MAX_INT, MAX_INT)),
                "calib_batch_size": COUNT, "calib_data": Opt(NAME),
                "lower": Opt(Str(enum=("fake", "int8")))},
               {"lower_compute": Opt(Str(enum=("bf16", "fp32")))})
LOC = Str(pattern=r"(?s).*:[0-9]{1,9}:[0-9]{1,9}")
RECIPE = Obj({"source": NAME, "settings": SETTINGS, "rules": List(Obj({
    "selector": Obj({"kind": Str(enum=("glob", "op", "type", "re", "module")),
                     "pattern": NAME, "optional": Bool}),
    "weight": PATCH, "activation": PATCH, "skip": Bool, "loc": LOC}))})
ACTIVATION_MODULE = Tagged("type", {"FakeQuant": {"bits": Int(1, 16), "symmetric": Bool},
                                    "DynamicFakeQuant": {"spec": TENSOR_SPEC},
                                    "FloatCast": {"float_dtype": FLOAT_DTYPE}})
DTYPE = Str(enum=("float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16",
                  "int32", "int64", "bool"))
REL_PATH = Str(pattern=r"(?!/)(?!.*(^|/)\.\.?(/|$))[^\\\x00]+", max_len=1024)

MARKER = Obj({
    "format": Str(enum=("qdsl-artifact",)),
    "format_version": Int(1, 2),
    "qdsl_version": NAME, "created": NAME,
    "model": Obj({"id": Str(pattern=r"(?s).+", max_len=1024), "hash": NAME}),
    "recipe": Obj({"source": NAME, "hash": NAME, "rules": RECIPE}),
    "settings": SETTINGS,
    "lower": Str(enum=("fake", "int8")),
    "mode": Str(enum=("generate", "plain")),
    "max_cache_len": Int(1, 1 << 20),
    "graph_hash": NAME,
    "quantizers": Obj({"activations": Map(ACTIVATION_MODULE), "weights": List(NAME)}),
}, {
    "int8": Obj({"self_contained": Bool, "fallback": Str(enum=("error", "simulate")),
                 "fallbacks": List(Obj({"node": NAME, "reason": Str()})),
                 "aliases": Map(NAME), "runtime_state": List(NAME),
                 "weight_qparams": Map(Pair(List(Int(0, MAX_INT), 0, 8), DTYPE))}),
    "files": Map(Obj({"sha256": Str(pattern=SHA256.pattern), "size": Int(0, 1 << 50)}),
                 key=REL_PATH),
})
PLAN = Obj({"graph_hash": NAME, "recipe_hash": NAME, "module_map": Map(NAME),
            "entries": List(Obj({"name": NAME, "role": NAME, "module": NAME,
                                 "weight": Opt(TENSOR_SPEC), "activation": TENSOR_SPEC,
                                 "decided_by": Map(Map(NAME))}))})

def validate(d: Path, rel: str, value: Any, schema: Check) -> None:
    try:
        schema(value, "")
    except Invalid as e:
        raise ArtifactError(f"artifact {d}: {rel}: {e}") from None


def validate_marker(d: Path, meta: Any) -> None:
    validate(d, "qdsl_artifact.json", meta, MARKER)
    if meta["format_version"] >= 2 and "files" not in meta:
        raise ArtifactError(f"artifact {d}: qdsl_artifact.json: missing key \"files\" "
                            "(the content hashes of format 2)")
    if meta["lower"] == "int8" and "int8" not in meta:
        raise ArtifactError(f"artifact {d}: qdsl_artifact.json: missing key \"int8\" "
                            "(an int8 artifact records its lowering)")


# --------------------------------------------------------------------------- cross-checks


def check_plan(d: Path, meta: dict, plan: dict) -> None:
    """plan.json against the marker: same recipe and graph, and the quantizers the
    marker records are the ones its entries call for (what ``freeze`` made)."""
    def bad(message):
        raise ArtifactError(f"artifact {d}: plan.json does not agree with qdsl_artifact.json: "
                            f"{message}")

    if plan["recipe_hash"] != meta["recipe"]["hash"]:
        bad(f"recipe hash {plan['recipe_hash']} vs {meta['recipe']['hash']}")
    if plan["graph_hash"] != meta["graph_hash"]:
        bad(f"graph hash {plan['graph_hash']} vs {meta['graph_hash']}")
    names = [e["name"] for e in plan["entries"]]
    if len(set(names)) != len(names):
        bad("a node is planned twice")
    acts, weights = meta["quantizers"]["activations"], set(meta["quantizers"]["weights"])
    for i, e in enumerate(plan["entries"]):
        w, a = e["weight"], e["activation"]
        if (w is not None and w["kind"] != "weight") or a["kind"] != "activation":
            bad(f"entries[{i}] has its weight and activation specs swapped")
        if (w is not None and w["bits"] is not None) != (e["name"] in weights):
            bad(f"node {e['name']}: weight quantizer {'missing' if w else 'unexpected'}")
        want = (None if a["bits"] is None and a["float_dtype"] == "fp32" else
                {"type": "FloatCast", "float_dtype": a["float_dtype"]} if a["bits"] is None else
                {"type": "DynamicFakeQuant", "spec": a} if a["dynamic"] else
                {"type": "FakeQuant", "bits": a["bits"], "symmetric": a["symmetric"]})
        if acts.get(e["name"]) != want:
            bad(f"node {e['name']}: activation quantizer {acts.get(e['name'])} "
                f"but the plan says {want}")
    extra = (set(acts) | weights) - set(names)
    if extra:
        bad(f"quantizers for nodes the plan does not have: {sorted(extra)[:3]}")


def check_recipe(d: Path, meta: dict) -> None:
    """recipe.qrec parses, and its rules (and, without includes, its hash) agree with
    the ones the marker records. Includes are not followed (they name files on the
    machine that compiled): the recorded rules from other files stand for them."""
    from ..lang.checker import check_document
    from ..lang.loader import read_text
    from ..lang.parser import parse_document
    from ..lang.syntax import IncludeLine
    from ..config.recipe import Recipe, Rule, Settings

    regular_file(d, "recipe.qrec")
    try:
        recorded = Recipe.from_json(meta["recipe"]["rules"])
    except (ValueError, TypeError, KeyError) as e:
        raise ArtifactError(f"artifact {d}: qdsl_artifact.json: recipe.rules: {e}") from None
    if recorded.hash() != meta["recipe"]["hash"]:
        raise ArtifactError(f"artifact {d}: qdsl_artifact.json: the recorded recipe rules do "
                            f"not have the recorded recipe hash {meta['recipe']['hash']}")
    text, diags = read_text(d / "recipe.qrec")
    if text is not None and not text.strip() and not diags:
        return  # a recipe built in Python has no text: the recorded rules are all there is
    items = []
    if text is not None:
        doc, more = parse_document(text, "recipe.qrec")
        items, checked, _ = check_document(doc)
        diags = [*diags, *more, *checked]
    errors = [x for x in diags if x.severity == "error"]
    if errors:
        e = errors[0]
        raise ArtifactError(f"artifact {d}: recipe.qrec does not parse: line {e.line}: "
                            f"{e.message[:200]}" + (f" (and {len(errors) - 1} more errors)"
                                                    if len(errors) > 1 else ""))
    own = [i for i in items if isinstance(i, Rule)]
    if not any(isinstance(i, IncludeLine) for i in items):
        settings = Settings()
        for s in items:
            if not isinstance(s, Rule):
                settings = settings.then(Settings(**{s.field: s.value}))
        if Recipe(tuple(own), settings).hash() == meta["recipe"]["hash"]:
            return
    else:
        mine = [r for r in recorded.rules if r.loc.file == recorded.source]
        if [(r, r.loc.line, r.loc.col) for r in mine] == \
                [(r, r.loc.line, r.loc.col) for r in own]:
            return
    raise ArtifactError(f"artifact {d}: recipe.qrec does not agree with the recipe recorded "
                        "in qdsl_artifact.json (hash or rules differ)")


# --------------------------------------------------------------------------- safetensors

_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8}


def read_safetensors(d: Path, rel: str) -> dict:
    """Tensors of a safetensors file whose header was checked against the file's size
    first (so nothing larger than the file is ever allocated); float tensors finite."""
    import torch
    from safetensors.torch import load_file

    size = regular_file(d, rel).st_size
    where = f"artifact {d}: {rel}"
    with open(d / rel, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > min(size - 8, MAX_ST_HEADER):
            raise ArtifactError(f"{where} is not a safetensors file (truncated, or its header "
                                "is damaged)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ArtifactError(f"{where}: the safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{where}: the safetensors header is not an object")
    data = size - 8 - n
    for name, e in header.items():
        if name == "__metadata__":
            continue
        ok = (isinstance(e, dict) and e.get("dtype") in _ST_ITEMSIZE
              and isinstance(e.get("shape"), list) and len(e["shape"]) <= 16
              and all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 1 << 48
                      for s in e["shape"])
              and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2
              and all(isinstance(o, int) and not isinstance(o, bool) for o in e["data_offsets"]))
        if ok:
            lo, hi = e["data_offsets"]
            ok = 0 <= lo <= hi <= data and hi - lo == math.prod(e["shape"]) * _ST_ITEMSIZE[e["dtype"]]
        if not ok:
            raise ArtifactError(f"{where}: the header entry of tensor {_show(name)} is damaged "
                                "or points past the end of the file")
    try:
        tensors = load_file(str(d / rel))
    except Exception as e:  # safetensors' own error type; any failure here is damage
        raise ArtifactError(f"{where} cannot be read: {str(e)[:200]}") from None
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ArtifactError(f"{where}: tensor {name} holds NaN or infinite values")
    return tensors


def check_quant_tensors(d: Path, meta: dict, plan: dict, tensors: dict) -> None:
    """quant_params.safetensors holds each quantizer's tensors: positive finite scales,
    integer zero points on the quantizer's grid, PEG permutations that are
    permutations; an activation's scale is 0-d (per tensor) or 1-d (PEG)."""
    import torch

    from ..quant.primitives import qrange

    where = f"artifact {d}: quant_params.safetensors"
    need: dict[str, tuple | None] = {}  # tensor name -> (bits, symmetric), None: optional
    for k, c in meta["quantizers"]["activations"].items():
        if c["type"] == "FakeQuant":
            need.update({f"act.{k}.scale": (c["bits"], c["symmetric"]),
                         f"act.{k}.zero_point": (c["bits"], c["symmetric"]),
                         f"act.{k}.perm": None})
            scale, zp = tensors.get(f"act.{k}.scale"), tensors.get(f"act.{k}.zero_point")
            perm = tensors.get(f"act.{k}.perm")
            if scale is not None and (scale.dim() > 1 or zp is None or zp.shape != scale.shape
                                      or (perm is not None and perm.shape != scale.shape)):
                raise ArtifactError(f"{where}: the tensors of act.{k} do not have matching "
                                    "0-d or 1-d shapes")
    stored_in_model = meta.get("int8", {}).get("weight_qparams", {})
    specs = {e["name"]: e["weight"] for e in plan["entries"] if e["weight"]}
    for k in meta["quantizers"]["weights"]:
        for part in ("scale", "zero_point"):
            key = f"weight.{k}.{part}"
            if key not in stored_in_model:
                need[key] = (specs[k]["bits"], specs[k]["symmetric"])
    for key, grid in need.items():
        required = grid is not None
        t = tensors.get(key)
        if t is None:
            if required:
                raise ArtifactError(f"{where}: tensor {key} is missing")
            continue
        if key.endswith(".scale") and not (t.is_floating_point() and bool((t > 0).all())):
            raise ArtifactError(f"{where}: tensor {key} must hold positive scales")
        if not key.endswith(".scale"):
            if t.is_floating_point() or t.dtype == torch.bool:
                raise ArtifactError(f"{where}: tensor {key} must be an integer tensor")
        if key.endswith(".zero_point") and t.numel():
            qmin, qmax = qrange(*grid)
            if int(t.min()) < qmin or int(t.max()) > qmax:
                raise ArtifactError(f"{where}: tensor {key} holds zero points outside the "
                                    f"{grid[0]}-bit grid {qmin}..{qmax}")
        if key.endswith(".perm") and not (t.dim() == 1 and torch.equal(
                torch.sort(t).values, torch.arange(t.numel(), dtype=t.dtype))):
            raise ArtifactError(f"{where}: tensor {key} is not a permutation")
    extra = set(tensors) - set(need)
    if extra:
        raise ArtifactError(f"{where}: tensors no quantizer uses: {sorted(extra)[:3]}")


# --------------------------------------------------------------------------- model/config.json

# config keys that size a transformers model, and the largest value a real one has
_CONFIG_BOUNDS = {"vocab_size": 1 << 24, "hidden_size": 1 << 17, "n_embd": 1 << 17,
                  "intermediate_size": 1 << 20, "n_inner": 1 << 20, "head_dim": 1 << 14,
                  "num_hidden_layers": 4096, "n_layer": 4096, "num_attention_heads": 1 << 14,
                  "n_head": 1 << 14, "num_key_value_heads": 1 << 14, "rotary_dim": 1 << 14,
                  "n_positions": 1 << 24, "max_position_embeddings": 1 << 24, "n_ctx": 1 << 24}


def check_config(d: Path) -> dict:
    """model/config.json: an object whose size keys are integers in sane bounds."""
    config = read_json(d, "model/config.json")
    if not isinstance(config, dict):
        raise ArtifactError(f"artifact {d}: model/config.json must be an object")
    for k, hi in _CONFIG_BOUNDS.items():
        v = config.get(k)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= hi):
            raise ArtifactError(f"artifact {d}: model/config.json: {k} must be an integer "
                                f"0..{hi}, got {_show(v)}")
    return config
