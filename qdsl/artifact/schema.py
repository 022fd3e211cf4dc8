"""The JSON of an artifact checked before it is used: qdsl_artifact.json and plan.json
against the schemas below (types, required keys, enums, ranges; a message names the
file and key path), and recipe.qrec against the recipe recorded in the marker (it
parses; rules and hash agree). Files: ``qdsl.artifact.files``; tensors:
``qdsl.artifact.tensors``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable

from ..config.recipe import Recipe, Rule, Settings, Transform
from ..errors import ArtifactError
from ..lang.checker import check_document
from ..lang.loader import read_text
from ..lang.parser import parse_document
from ..lang.syntax import IncludeLine
from .files import regular_file

MAX_INT = 1 << 31
SHA256 = re.compile(r"[0-9a-f]{64}")


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
ROUNDING = Tagged("name", {"gptq": {"damp": Num(1e-12, 1.0), "block": SIZE, "act_order": Bool},
                           "awq": {"grid": Int(1, 1000), "clip": Bool}, "rtn": {}})
TENSOR_SPEC = Obj({"kind": Str(enum=("weight", "activation")), "bits": Opt(Int(1, 16)),
                   "float_dtype": FLOAT_DTYPE, "symmetric": Bool, "granularity": GRANULARITY,
                   "observer": OBSERVER, "dynamic": Bool}, {"rounding": Opt(ROUNDING)})
PATCH = Obj({"bits": Opt(Int(1, 16, also=(32,))), "float_dtype": Opt(FLOAT_DTYPE),
             "symmetric": Opt(Bool), "granularity": Opt(GRANULARITY),
             "observer": Opt(OBSERVER), "dynamic": Opt(Bool)}, {"rounding": Opt(ROUNDING)})
COUNT = Opt(Int(0, MAX_INT))
SETTINGS = Obj({"calib_samples": COUNT, "calib_seq_len": COUNT, "calib_seed": Opt(Int(-MAX_INT, MAX_INT)),
                "calib_batch_size": COUNT, "calib_data": Opt(NAME),
                "lower": Opt(Str(enum=("fake", "int8")))},
               {"lower_compute": Opt(Str(enum=("bf16", "fp32"))),
                "lower_kv_cache": Opt(Str(enum=("fp32", "fp16", "bf16"))),
                "export": Opt(Str(enum=("gguf", "compressed-tensors"))),
                "student_blocks": Opt(Str(pattern=r"[a-z_]{1,20}|[0-9, ]{1,2000}")),
                "train_logits": Opt(Num(0, 1e30)), "train_hidden": Opt(Num(0, 1e30)),
                "train_attn": Opt(Num(0, 1e30)), "train_dampen": Opt(Num(0, 1e30)),
                "train_lr": Opt(Num(0, 1e30)), "train_warmup": Opt(Num(0, 1)),
                "train_freeze": Opt(Num(0, 1)),
                "train_scales": Opt(Str(enum=("mean", "learned")))})
LOC = Str(pattern=r"(?s).*:[0-9]{1,9}:[0-9]{1,9}")
SELECTOR = Obj({"kind": Str(enum=("glob", "op", "type", "re", "module")),
                "pattern": NAME, "optional": Bool}, {"port": Str(enum=("input",))})
RECIPE = Obj({"source": NAME, "settings": SETTINGS, "rules": List(Obj({
    "selector": SELECTOR, "weight": PATCH, "activation": PATCH, "skip": Bool, "loc": LOC}))},
    {"transforms": List(Obj({"kind": Str(enum=("smooth", "rotate")), "selector": Opt(SELECTOR),
                             "params": Map(Num(0.0, 1.0)), "loc": LOC}))})
# format 3: each activation quantizer is its type and the TensorSpec it runs
ACTIVATION_MODULE = Tagged("type", {t: {"spec": TENSOR_SPEC}
                                    for t in ("FakeQuant", "DynamicFakeQuant", "FloatCast")})
# formats 1 and 2 (read through qdsl.artifact.migrate)
ACTIVATION_MODULE_V2 = Tagged("type", {"FakeQuant": {"bits": Int(1, 16), "symmetric": Bool},
                                       "DynamicFakeQuant": {"spec": TENSOR_SPEC},
                                       "FloatCast": {"float_dtype": FLOAT_DTYPE}})
DTYPE = Str(enum=("float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16",
                  "int32", "int64", "bool"))
REL_PATH = Str(pattern=r"(?!/)(?!.*(^|/)\.\.?(/|$))[^\\\x00]+", max_len=1024)


def _marker(versions: tuple[int, int], activation_module: Check) -> Check:
    """The marker schema of the format versions ``versions`` (lo, hi)."""
    return Obj({
        "format": Str(enum=("qdsl-artifact",)),
        "format_version": Int(*versions),
        "qdsl_version": NAME, "created": NAME,
        "model": Obj({"id": Str(pattern=r"(?s).+", max_len=1024), "hash": NAME}),
        "recipe": Obj({"source": NAME, "hash": NAME, "rules": RECIPE}),
        "settings": SETTINGS,
        "lower": Str(enum=("fake", "int8")),
        "mode": Str(enum=("generate", "plain")),
        "max_cache_len": Int(1, 1 << 20),
        "graph_hash": NAME,
        "quantizers": Obj({"activations": Map(activation_module), "weights": List(NAME)},
                          {"smooth": List(NAME),
                           "codes": List(NAME), "in_scales": List(NAME)}),  # GPTQ / AWQ
    }, {
        "int8": Obj({"self_contained": Bool, "fallback": Str(enum=("error", "simulate")),
                     "fallbacks": List(Obj({"node": NAME, "reason": Str()})),
                     "aliases": Map(NAME), "runtime_state": List(NAME),
                     "weight_qparams": Map(Pair(List(Int(0, MAX_INT), 0, 8), DTYPE))}),
        "files": Map(Obj({"sha256": Str(pattern=SHA256.pattern), "size": Int(0, 1 << 50)}),
                     key=REL_PATH),
    })


MARKER = _marker((3, 3), ACTIVATION_MODULE)
MARKER_V2 = _marker((1, 2), ACTIVATION_MODULE_V2)
PLAN = Obj({"graph_hash": NAME, "recipe_hash": NAME, "module_map": Map(NAME),
            "entries": List(Obj({"name": NAME, "role": NAME, "module": NAME,
                                 "weight": Opt(TENSOR_SPEC), "activation": TENSOR_SPEC,
                                 "decided_by": Map(Map(NAME))}))},
           {"transforms": List(Obj({"kind": Str(enum=("smooth", "rotate")), "loc": LOC,
                                    "alpha": Num(0.0, 1.0), "producer": Str(), "fold": Str(),
                                    "fold_kind": Str(enum=("", "norm", "linear")),
                                    "consumers": List(NAME)}))})


def validate(d: Path, rel: str, value: Any, schema: Check) -> None:
    try:
        schema(value, "")
    except Invalid as e:
        raise ArtifactError(f"artifact {d}: {rel}: {e}") from None


def validate_marker(d: Path, meta: Any) -> None:
    old = isinstance(meta, dict) and meta.get("format_version") in (1, 2)
    validate(d, "qdsl_artifact.json", meta, MARKER_V2 if old else MARKER)
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
                {"type": "FloatCast" if a["bits"] is None else
                 "DynamicFakeQuant" if a["dynamic"] else "FakeQuant", "spec": a})
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
    own_transforms = [i for i in items if isinstance(i, Transform)]
    if not any(isinstance(i, IncludeLine) for i in items):
        settings = Settings()
        for s in items:
            if not isinstance(s, (Rule, Transform)):
                settings = settings.then(Settings(**{s.field: s.value}))
        if Recipe(tuple(own), settings,
                  transforms=tuple(own_transforms)).hash() == meta["recipe"]["hash"]:
            return
    else:
        mine = [r for r in recorded.rules if r.loc.file == recorded.source]
        mine_t = [t for t in recorded.transforms if t.loc.file == recorded.source]
        if [(r, r.loc.line, r.loc.col) for r in mine] == \
                [(r, r.loc.line, r.loc.col) for r in own] and \
                [(t, t.loc.line) for t in mine_t] == [(t, t.loc.line) for t in own_transforms]:
            return
    raise ArtifactError(f"artifact {d}: recipe.qrec does not agree with the recipe recorded "
                        "in qdsl_artifact.json (hash or rules differ)")
