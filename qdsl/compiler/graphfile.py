"""A lowered graph stored as JSON (``graph.json``), so an int8 artifact runs without
capturing its model again.

Loading a self-contained ``--lower int8`` artifact the long way (``qdsl.compiler.lowered``)
rebuilds the float model from ``model/config.json`` on the meta device, captures it with
``torch.export`` and replays the INT8 pipeline: seconds of work and, measured on
SmolLM2-135M's 1W8A artifact, ~50 MiB of resident memory that is not the model (the
capture's fake tensors and shape environment, the skeleton's parameters, transformers'
model-building modules, torch's export caches; docs/results-demoor.md, Table 2). The
graph those steps produce is the same every time, so ``QuantizedModel.save`` also
writes it down and the runtime loads it directly:

    graph.json   {"format": "qdsl-graph", "version": 1, "mode", "max_cache_len",
                  "batch_size", "in_spec" / "out_spec" (torch's pytree JSON of the
                  forward's inputs and outputs), "modules": {target: module JSON},
                  "tensors": {name: [shape, dtype, kind]}, "nodes": [...]}

(``kind``: parameter, buffer, temporary (a non-persistent buffer) or attribute (a plain
tensor, e.g. export's lifted constants), as the captured graph held it.)

Each node is ``{"name", "op", "target", "args", "kwargs"}``. Nothing in the file is
executed as code: a ``call_function`` target is an operator of ``torch.ops``' ``aten``,
``qdsl`` or ``qdsl_kernels`` namespaces or one of a few ``operator`` functions; a
``call_module`` target's module is one of qdsl's runtime types
(``qdsl.runtime.registry.GRAPH_TYPES``), rebuilt from its ``to_json()`` on the meta
device; argument values are JSON scalars and lists, node references and tagged
objects (``{"tuple": [...]}``, ``{"dtype": "float32"}``, ``{"device": "cpu"}``,
``{"layout": ...}``, ``{"memory_format": ...}``, ``{"slice": [a, b, c]}``,
``{"float": "inf"}``, ``{"dict": {...}}``). Tensors come from ``model.safetensors``
as before (the file only holds their shapes). ``torch.export``'s input-guard module
(``_guards_fn``, no outputs) is not stored: the runtime checks its inputs itself.

A graph this module cannot write (a target or value outside that set) is simply not
stored (``to_json`` returns None and says why at debug level); such an artifact, one
stored by an older qdsl, or a request for another cache length or batch size than the
stored graph's, loads by capture as before.
"""

from __future__ import annotations

import logging
import math
import operator
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

from ..errors import ArtifactError
from ..graph.attrs import graph_tensors
from ..runtime.registry import FAKE_TYPES, GRAPH_TYPES, module_from_json

log = logging.getLogger(__name__)

GRAPH_FILE = "graph.json"
FORMAT, VERSION = "qdsl-graph", 1
OP_NAMESPACES = ("aten", "qdsl", "qdsl_kernels")
OPERATORS = {f.__name__: f for f in (
    operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv,
    operator.truediv, operator.mod, operator.neg, operator.eq, operator.ne, operator.lt,
    operator.le, operator.gt, operator.ge)}
NODE_OPS = ("placeholder", "get_attr", "call_function", "call_module", "output")
DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8,
    torch.int16, torch.int32, torch.int64, torch.bool)}
LAYOUTS = {"strided": torch.strided}
MEMORY_FORMATS = {str(f).removeprefix("torch."): f for f in (
    torch.contiguous_format, torch.preserve_format, torch.channels_last)}
GUARDS = "_guards_fn"   # torch.export's input-guard module (ExportedProgram.module())


class Unstorable(Exception):
    """A graph ``to_json`` cannot write (why)."""


# ------------------------------------------------------------------------- write

def to_json(gm: fx.GraphModule, *, mode: str, max_cache_len: int, batch_size: int
            ) -> dict | None:
    """``gm`` (a lowered graph) as ``graph.json``'s content, or None when it holds a
    target or value this format does not cover (logged: the artifact then loads by
    capture)."""
    try:
        return _to_json(gm, mode, max_cache_len, batch_size)
    except Unstorable as e:
        log.debug("graph not stored (the artifact loads by capture): %s", e)
        return None


def _to_json(gm: fx.GraphModule, mode: str, max_cache_len: int, batch_size: int) -> dict:
    codegen = gm.graph._codegen
    info = codegen.pytree_info if isinstance(codegen, _PyTreeCodeGen) else None
    modules, nodes = {}, []
    for n in gm.graph.nodes:
        if n.op not in NODE_OPS:
            raise Unstorable(f"node {n.name}: op {n.op}")
        if n.op == "call_module" and n.target == GUARDS and not n.users:
            continue
        if n.op == "call_module":
            mod = gm.get_submodule(n.target)
            if GRAPH_TYPES.get(type(mod).__name__) is not type(mod):
                raise Unstorable(f"node {n.name}: module {type(mod).__name__}")
            modules[n.target] = mod.to_json()
        nodes.append({"name": n.name, "op": n.op, "target": _target(n),
                      "args": _value(n.args, n.name),
                      "kwargs": {k: _value(v, n.name) for k, v in n.kwargs.items()}})
    tensors = {}
    for k, t in graph_tensors(gm).items():
        if str(t.dtype).removeprefix("torch.") not in DTYPES:
            raise Unstorable(f"tensor {k}: dtype {t.dtype}")
        tensors[k] = [list(t.shape), str(t.dtype).removeprefix("torch."), _kind(gm, k)]
    return {"format": FORMAT, "version": VERSION, "torch": torch.__version__,
            "mode": mode, "max_cache_len": max_cache_len, "batch_size": batch_size,
            "orig_args": list(info.orig_args) if info else None,
            "in_spec": pytree.treespec_dumps(info.in_spec) if info else None,
            "out_spec": (pytree.treespec_dumps(info.out_spec)
                         if info and info.out_spec is not None else None),
            "modules": modules, "tensors": tensors, "nodes": nodes}


def _target(n: fx.Node) -> str:
    if n.op != "call_function":
        return n.target
    t = n.target
    if isinstance(t, torch._ops.OpOverload) and t.namespace in OP_NAMESPACES:
        return f"{t.namespace}.{t._opname}.{t._overloadname}"
    if OPERATORS.get(getattr(t, "__name__", None)) is t:
        return f"operator.{t.__name__}"
    raise Unstorable(f"node {n.name}: function {t}")


def _kind(gm: nn.Module, target: str) -> str:
    path, _, name = target.rpartition(".")
    owner = gm.get_submodule(path) if path else gm
    if name in owner._buffers:
        return "buffer" if name not in owner._non_persistent_buffers_set else "temporary"
    return "parameter" if name in owner._parameters else "attribute"


def _value(v: Any, node: str) -> Any:
    if isinstance(v, fx.Node):
        return {"node": v.name}
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"float": repr(v)}
    if isinstance(v, list):
        return [_value(x, node) for x in v]
    if isinstance(v, tuple):
        return {"tuple": [_value(x, node) for x in v]}
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {"dict": {k: _value(x, node) for k, x in v.items()}}
    if isinstance(v, torch.dtype) and str(v).removeprefix("torch.") in DTYPES:
        return {"dtype": str(v).removeprefix("torch.")}
    if isinstance(v, torch.device):
        return {"device": str(v)}
    if isinstance(v, torch.layout) and v in LAYOUTS.values():
        return {"layout": "strided"}
    if isinstance(v, torch.memory_format) and v in MEMORY_FORMATS.values():
        return {"memory_format": str(v).removeprefix("torch.")}
    if isinstance(v, slice):
        return {"slice": [_value(x, node) for x in (v.start, v.stop, v.step)]}
    raise Unstorable(f"node {node}: argument of type {type(v).__name__}")


# -------------------------------------------------------------------------- read

def from_json(doc: Any, where: str) -> fx.GraphModule:
    """The graph module of a ``graph.json`` (``where``: the artifact, for messages):
    every module and tensor on the meta device, to be assigned the stored tensors.
    A file this qdsl cannot rebuild is an ArtifactError naming the node and why."""
    def bad(what: str) -> ArtifactError:
        return ArtifactError(f"artifact {where}: {GRAPH_FILE}: {what}")

    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise bad(f"not a {FORMAT} file of version {VERSION} (recompile the artifact, or "
                  f"delete {GRAPH_FILE} and its line in qdsl_artifact.json to load by capture)")
    try:
        tensors = {k: (list(map(int, shape)), DTYPES[dtype], kind)
                   for k, (shape, dtype, kind) in doc["tensors"].items()}
        root = nn.Module()
        for target, config in doc["modules"].items():
            if config.get("type") not in GRAPH_TYPES:
                raise bad(f"module {target} has type {config.get('type')!r}, not one of "
                          "qdsl's runtime modules")
            state = None                # the fake-quant modules are built from their tensors
            if config["type"] in FAKE_TYPES:
                state = {k[len(target) + 1:]: torch.empty(s, dtype=d, device="meta")
                         for k, (s, d, _) in tensors.items() if k.startswith(target + ".")}
            _place(root, target, module_from_json(config, state))
        for k, (shape, dtype, kind) in tensors.items():
            path, _, name = k.rpartition(".")
            if path in doc["modules"]:
                continue                          # the module made it
            _set(_container(root, path), name, torch.empty(shape, dtype=dtype, device="meta"),
                 kind)
        graph = fx.Graph()
        env: dict[str, fx.Node] = {}
        for spec in doc["nodes"]:
            op, name = spec["op"], spec["name"]
            if op not in NODE_OPS:
                raise bad(f"node {name}: op {op!r}")
            target = _resolve(spec["target"], name, bad) if op == "call_function" \
                else str(spec["target"])
            args = _decode(spec["args"], env, name, bad)
            kwargs = {str(k): _decode(v, env, name, bad) for k, v in spec["kwargs"].items()}
            node = graph.create_node(op, target, tuple(args) if isinstance(args, list) else args,
                                     kwargs, name=name)
            if node.name != name:
                raise bad(f"node {name} appears twice")
            env[name] = node
        if doc["in_spec"] is not None:
            graph._codegen = _PyTreeCodeGen(_PyTreeInfo(
                list(doc["orig_args"]), pytree.treespec_loads(doc["in_spec"]),
                None if doc["out_spec"] is None else pytree.treespec_loads(doc["out_spec"])))
        graph.lint()
        gm = fx.GraphModule(root, graph)
    except ArtifactError:
        raise
    except Exception as e:  # a damaged file: any of many types, all one message
        raise bad(f"cannot rebuild the graph: {type(e).__name__}: {str(e)[:200]}") from None
    if doc["in_spec"] is not None:
        gm._in_spec, gm._out_spec = graph._codegen.pytree_info[1:]
    for k, (_, _, kind) in tensors.items():   # GraphModule made every plain tensor a
        path, _, name = k.rpartition(".")      # persistent buffer: as the capture had them
        owner = gm.get_submodule(path) if path else gm
        if kind == "attribute" and name in owner._buffers:
            setattr(owner, name, owner._buffers.pop(name))   # a constant (export's lifted ones)
        elif kind == "temporary":
            owner._non_persistent_buffers_set.add(name)      # e.g. rotary inv_freq
    return gm


def _resolve(target: Any, node: str, bad):
    parts = str(target).split(".")
    if len(parts) == 2 and parts[0] == "operator" and parts[1] in OPERATORS:
        return OPERATORS[parts[1]]
    if len(parts) == 3 and parts[0] in OP_NAMESPACES:
        try:
            return getattr(getattr(getattr(torch.ops, parts[0]), parts[1]), parts[2])
        except (AttributeError, RuntimeError):
            raise bad(f"node {node} calls {target}, which this torch ({torch.__version__}) "
                      "does not have") from None
    raise bad(f"node {node} calls {target!r}, not an operator qdsl stores")


def _decode(v: Any, env: dict[str, fx.Node], node: str, bad) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        return [_decode(x, env, node, bad) for x in v]
    if isinstance(v, dict) and len(v) == 1:
        (tag, x), = v.items()
        if tag == "node":
            if x not in env:
                raise bad(f"node {node} reads {x!r} before it is defined")
            return env[x]
        if tag == "tuple":
            return tuple(_decode(y, env, node, bad) for y in x)
        if tag == "dict":
            return {str(k): _decode(y, env, node, bad) for k, y in x.items()}
        if tag == "float" and x in ("inf", "-inf", "nan"):
            return float(x)
        if tag == "slice" and isinstance(x, list) and len(x) == 3:
            return slice(*(_decode(y, env, node, bad) for y in x))
        table = {"dtype": DTYPES, "layout": LAYOUTS, "memory_format": MEMORY_FORMATS}.get(tag)
        if table is not None and x in table:
            return table[x]
        if tag == "device" and isinstance(x, str):
            return torch.device(x)
    raise bad(f"node {node}: argument {str(v)[:80]} is not a value qdsl stores")


def _container(root: nn.Module, path: str) -> nn.Module:
    """The module at dotted ``path`` under ``root``, plain ``nn.Module``s made on the way."""
    mod = root
    for part in path.split(".") if path else ():
        if part not in mod._modules:
            mod.add_module(part, nn.Module())
        mod = mod._modules[part]
    return mod


def _place(root: nn.Module, target: str, module: nn.Module) -> None:
    path, _, name = target.rpartition(".")
    _container(root, path).add_module(name, module)


def _set(owner: nn.Module, name: str, t: torch.Tensor, kind: str) -> None:
    if kind == "parameter":
        owner.register_parameter(name, nn.Parameter(t, requires_grad=False))
    elif kind in ("buffer", "temporary"):
        owner.register_buffer(name, t, persistent=kind == "buffer")
    else:
        setattr(owner, name, t)
