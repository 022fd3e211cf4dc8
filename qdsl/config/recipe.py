"""The checked recipe: typed, immutable, independent of torch.

A ``Recipe`` is what the language front end produces from ``.qrec`` text and
what the planner consumes. Rules are kept in source order (the cascade: a
later rule overrides the attributes it sets); each carries its location.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .spec import TensorPatch
from .student import fraction_value, lr_value, student_value, weight_value

SELECTOR_KINDS = ("glob", "op", "type", "re", "module")
# Ports a selector may name after its pattern: `.input` = the tensor a linear reads.
PORTS = ("input",)


@dataclass(frozen=True)
class Loc:
    """Where a rule or setting was written (1-based line and column)."""

    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True)
class Selector:
    """Which graph nodes a rule applies to.

    kind:
      * ``glob``   dotted glob over canonical names: ``block.*.res_sum``,
                   ``block.[0-5].mlp.*``, a bare suffix ``mlp.c_fc`` (= that
                   part in every block), ``*`` (every node).
      * ``op``     the node's operation: ``op:softmax``, ``op:add``.
      * ``type``   the module class behind the node: ``type:Linear``.
      * ``re``     Python regex over canonical names (full match).
      * ``module`` glob over the original module path: ``module:transformer.h.*.mlp.c_fc``.
    ``optional``: the rule may match nothing without an error (``?`` suffix).
    ``port``: None = the matched nodes themselves (their weight and output); ``"input"``
    (``.input`` after the pattern) = the input activation of each matched linear, i.e.
    the output of the named node it reads (docs/language.md, "Linear inputs").
    """

    kind: str
    pattern: str
    optional: bool = False
    port: str | None = None

    def __post_init__(self) -> None:
        assert self.kind in SELECTOR_KINDS, f"unknown selector kind {self.kind!r}"
        assert self.port is None or self.port in PORTS, f"unknown port {self.port!r}"

    def text(self) -> str:
        """The selector as a recipe writes it (``selector_text``)."""
        return selector_text(self.kind, self.pattern, self.optional, self.port)

    def to_json(self) -> dict[str, Any]:
        """``port`` only when set, so recipes without one keep their hashes."""
        d: dict[str, Any] = {"kind": self.kind, "pattern": self.pattern,
                             "optional": self.optional}
        if self.port is not None:
            d["port"] = self.port
        return d


def selector_text(kind: str, pattern: str, optional: bool = False,
                  port: str | None = None) -> str:
    """A selector as recipe text, which parses back to the same selector: a glob bare,
    ``re:"PATTERN"`` quoted, any other kind ``KIND:PATTERN``; ``.PORT`` if a port is
    named; ``?`` if optional. The one renderer: the formatter, the syntax tree and the
    planner's messages all use it."""
    if kind == "glob":
        body = pattern
    elif kind == "re":
        body = f're:"{pattern}"'
    else:
        body = f"{kind}:{pattern}"
    return body + (f".{port}" if port else "") + ("?" if optional else "")


@dataclass(frozen=True)
class Rule:
    """``SELECTOR -> SPEC``: the patches this rule applies to matched nodes.

    ``skip`` = the node stays entirely float (both tensors), overriding
    everything earlier; a later rule may quantize it again.
    """

    selector: Selector
    weight: TensorPatch = field(default_factory=TensorPatch)
    activation: TensorPatch = field(default_factory=TensorPatch)
    skip: bool = False
    loc: Loc = field(default=Loc("<string>", 1, 1), compare=False)

    def sets_weight(self) -> bool:
        return self.selector.port is None and (self.skip or not self.weight.is_empty())

    def sets_activation(self) -> bool:
        return self.skip or not self.activation.is_empty()


# transform -> its parameters and their defaults (docs/algorithms.md)
TRANSFORM_PARAMS: dict[str, dict[str, float]] = {
    "smooth": {"alpha": 0.5},   # SmoothQuant migration strength, 0..1
    "rotate": {},               # QuaRot-style Hadamard rotation of the residual stream
}


@dataclass(frozen=True)
class Transform:
    """``smooth SELECTOR alpha=A`` or ``rotate``: a graph transform that runs before
    the observers (passes.transform). ``params``: (name, value) pairs, every one of
    ``TRANSFORM_PARAMS[kind]`` given (the checker fills in the defaults)."""

    kind: str
    selector: Selector | None = None
    params: tuple[tuple[str, float], ...] = ()
    loc: Loc = field(default=Loc("<string>", 1, 1), compare=False)

    def __post_init__(self) -> None:
        assert self.kind in TRANSFORM_PARAMS, f"unknown transform {self.kind!r}"

    def param(self, name: str) -> float:
        return dict(self.params).get(name, TRANSFORM_PARAMS[self.kind][name])

    def text(self) -> str:
        """The statement as a recipe writes it."""
        parts = [self.kind] + ([self.selector.text()] if self.selector else [])
        return " ".join(parts + [f"{k}={v!r}" for k, v in self.params])

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind,
                "selector": self.selector.to_json() if self.selector else None,
                "params": {k: v for k, v in self.params}, "loc": str(self.loc)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Transform:
        return cls(d["kind"], Selector(**d["selector"]) if d["selector"] else None,
                   tuple(d["params"].items()), _loc(d["loc"]))


def _loc(s: str) -> Loc:
    file, line, col = s.rsplit(":", 2)
    return Loc(file, int(line), int(col))


@dataclass(frozen=True)
class Settings:
    """Calibration and lowering settings; None = not set (use the default or the CLI)."""

    calib_samples: int | None = None
    calib_seq_len: int | None = None
    calib_seed: int | None = None
    calib_batch_size: int | None = None
    calib_data: str | None = None
    lower: str | None = None  # "fake" | "int8"
    lower_compute: str | None = None  # weight-only kernels: "bf16" (fast) | "fp32" (exact)
    lower_kv_cache: str | None = None  # key/value cache: "fp32" (default) | "fp16" | "bf16"
    export: str | None = None  # "gguf" | "compressed-tensors": the format the result must fit
    student_blocks: str | None = None  # layer reduction (config/student.py): "every_other", "1,3"
    train_logits: float | None = None  # qdsl train: XTC loss weights (default 1 each)
    train_hidden: float | None = None
    train_attn: float | None = None
    train_dampen: float | None = None  # qdsl train: oscillation dampening weight (default 0)
    train_lr: float | None = None      # qdsl train: peak learning rate (default 5e-4; --lr wins)
    train_warmup: float | None = None  # qdsl train: warm-up fraction (default 0.2; --warmup wins)
    train_freeze: float | None = None  # qdsl train: freezing threshold on the flip frequency
    train_scales: str | None = None    # qdsl train: 1-bit scales "mean" (XTC) | "learned"

    def then(self, later: Settings) -> Settings:
        """Later settings (an including file, the command line) override earlier ones."""
        return replace(self, **{f.name: getattr(later, f.name) for f in fields(later)
                                if getattr(later, f.name) is not None})

    def to_json(self) -> dict[str, Any]:
        """Every field; fields added later (``_LATER``) only when set, so the hashes of
        recipes that do not use them (sweep cache keys) stay what they were."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in _LATER or getattr(self, f.name) is not None}


_LATER = ("lower_compute", "export", "student_blocks", "train_logits", "train_hidden",
          "train_attn", "train_dampen", "train_lr", "train_warmup", "train_freeze",
          "train_scales", "lower_kv_cache")


# Recipe-syntax key of each setting, its field and its type.
SETTING_KEYS: dict[str, tuple[str, type]] = {
    "calib.samples": ("calib_samples", int),
    "calib.seq_len": ("calib_seq_len", int),
    "calib.seed": ("calib_seed", int),
    "calib.batch_size": ("calib_batch_size", int),
    "calib.data": ("calib_data", str),
    "lower": ("lower", str),
    "lower.compute": ("lower_compute", str),
    "lower.kv_cache": ("lower_kv_cache", str),
    "export": ("export", str),
    "student.blocks": ("student_blocks", student_value),
    "train.logits": ("train_logits", weight_value),
    "train.hidden": ("train_hidden", weight_value),
    "train.attn": ("train_attn", weight_value),
    "train.dampen": ("train_dampen", weight_value),
    "train.lr": ("train_lr", lr_value),
    "train.warmup": ("train_warmup", fraction_value),
    "train.freeze": ("train_freeze", fraction_value),
    "train.scales": ("train_scales", str),
}
LOWER_TARGETS = ("fake", "int8")
LOWER_COMPUTE = ("bf16", "fp32")
KV_CACHE = ("fp32", "fp16", "bf16")
TRAIN_SCALES = ("mean", "learned")
# `set export = gguf | compressed_tensors` (the word; "compressed-tensors" quoted also)
EXPORT_TARGETS = ("gguf", "compressed-tensors")
SETTING_CHOICES = {"lower": LOWER_TARGETS, "lower.compute": LOWER_COMPUTE,
                   "lower.kv_cache": KV_CACHE, "export": EXPORT_TARGETS,
                   "train.scales": TRAIN_SCALES}


@dataclass(frozen=True)
class Recipe:
    """A checked recipe: rules in cascade order (includes spliced in) and settings."""

    rules: tuple[Rule, ...]
    settings: Settings = field(default_factory=Settings)
    source: str = "<string>"  # the file it was read from
    text: str = ""  # the file's text, as written (kept in artifacts)
    transforms: tuple[Transform, ...] = ()  # in file order (includes spliced in)

    def to_json(self) -> dict[str, Any]:
        extra = {"transforms": [t.to_json() for t in self.transforms]} if self.transforms else {}
        return {
            **extra,
            "source": self.source,
            "settings": self.settings.to_json(),
            "rules": [{
                "selector": r.selector.to_json(),
                "weight": r.weight.to_json(), "activation": r.activation.to_json(),
                "skip": r.skip, "loc": str(r.loc)} for r in self.rules],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], text: str = "") -> Recipe:
        """Rebuild a checked recipe from ``to_json`` (includes already spliced in)."""
        def loc(s: str) -> Loc:
            file, line, col = s.rsplit(":", 2)
            return Loc(file, int(line), int(col))

        transforms = tuple(Transform.from_json(t) for t in d.get("transforms", ()))
        rules = tuple(Rule(selector=Selector(**r["selector"]),
                           weight=TensorPatch.from_json(r["weight"]),
                           activation=TensorPatch.from_json(r["activation"]),
                           skip=r["skip"], loc=loc(r["loc"])) for r in d["rules"])
        return cls(rules=rules, settings=Settings(**d["settings"]), source=d["source"], text=text,
                   transforms=transforms)

    def hash(self) -> str:
        """Content hash of the meaning (rules and settings), not of the formatting."""
        payload = self.to_json()
        payload.pop("source")
        for r in payload["rules"] + payload.get("transforms", []):
            r.pop("loc")
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
