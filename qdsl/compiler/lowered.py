"""Load a self-contained ``--lower int8`` artifact without a float detour (gpt-fast style).

    config.json --meta device--> model --to_empty--> capture --params to meta-->
    the INT8 pipeline (structure only) --assign--> stored integer tensors

``torch.export`` cannot trace a model whose parameters are on ``meta`` while the
static key/value cache is on the CPU (``index_copy_`` refuses mixed devices), and
exporting with meta inputs would bake ``device=meta`` into the graph. The cheapest
honest route: ``to_empty(device="cpu")`` gives the parameters uninitialised CPU
memory that nothing ever writes or reads (tracing only looks at shapes), so the
pages are never resident; right after capture every parameter and buffer is
swapped for a meta tensor, the passes build the runtime modules on meta, and the
stored tensors are assigned (``load_state_dict(..., assign=True)``). Run-time state
(the key/value cache) is zero-initialised. Peak memory stays near the quantized size.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from ..artifact.files import read_json
from ..artifact.store import assign_tensors
from ..graph.attrs import graph_tensors
from ..artifact.tensors import check_config, read_safetensors
from ..config.recipe import Recipe, Settings
from ..errors import ArtifactError
from ..graph.capture import capture, max_positions
from ..graph.naming import name_graph
from ..models.zoo import checkpoint_architecture
from ..passes.freeze import Frozen
from ..passes.pipeline import INT8, PassContext, run
from . import graphfile
from .build import QuantizedModel, as_model
from .graphfile import GRAPH_FILE
from .source import artifact_errors, check_source, plan_of


def _to_meta(gm: torch.nn.Module) -> None:
    """Swap every parameter and buffer for a meta tensor of the same shape (sharing kept)."""
    memo: dict[int, torch.Tensor] = {}
    for mod in gm.modules():
        for store in (mod._parameters, mod._buffers):
            for k, t in store.items():
                if t is None:
                    continue
                if id(t) not in memo:
                    meta = torch.empty_like(t, device="meta")
                    memo[id(t)] = (torch.nn.Parameter(meta, requires_grad=False)
                                   if isinstance(t, torch.nn.Parameter) else meta)
                store[k] = memo[id(t)]


def meta_model(config_dir: Path, max_bytes: int | None = None,
               modules: set[str] | None = None) -> torch.nn.Module:
    """The source architecture from its config.json, parameters uninitialised (never
    touched). Decided on the meta device, before any memory is taken or any graph is
    captured, refused with an ArtifactError: a float model larger than ``max_bytes``,
    or one with modules holding parameters that ``modules`` (the plan's module map)
    does not have (a config edited after the compile: more layers, other names)."""
    # the class the config declares: an encoder is rebuilt without an LM head
    auto = AutoModelForCausalLM if checkpoint_architecture(config_dir).causal else AutoModel
    config = AutoConfig.from_pretrained(config_dir, local_files_only=True)
    with torch.device("meta"):
        model = auto.from_config(config, attn_implementation="eager")
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}.values()
    size = sum(t.numel() * t.element_size() for t in tensors)
    if max_bytes is not None and size > max_bytes:
        raise ArtifactError(f"artifact {config_dir.parent}: model/config.json describes a "
                            f"model of {size / 1e9:.3g} GB in float, more than its stored "
                            f"tensors can be ({max_bytes / 1e9:.3g} GB at most)")
    if modules is not None:
        extra = sorted(n for n, m in model.named_modules()
                       if n not in modules and any(True for _ in m.parameters(recurse=False)))
        if extra:
            raise ArtifactError(f"artifact {config_dir.parent}: model/config.json describes "
                                f"{len(extra)} module(s) the plan does not have (e.g. "
                                f"{extra[0]}): it is not the model the artifact was compiled "
                                "from")
    model = model.to_empty(device="cpu")  # to_empty unties shared tensors: tie them again
    model.tie_weights()
    return model.eval()


def load_int8(path, meta: dict, plan_json: dict, tensors: dict[str, torch.Tensor], model=None,
              same_model: bool = False, batch_size: int = 1):
    """``qdsl.load`` for a self-contained int8 artifact -> QuantizedModel. ``same_model``:
    ``meta`` asks for another cache length than the compile's, or ``batch_size`` > 1
    rows (another capture of the same model: ``QuantPlan.check_graph``)."""
    d, info = Path(path), meta["int8"]
    if model is not None:  # optional: must be the model the artifact was compiled from
        check_source(as_model(model)[0], meta, d)
    check_config(d)
    # the float model is at most 32x its stored form (1-bit codes) plus run-time buffers
    limit = 32 * (d / "model.safetensors").stat().st_size + (256 << 20)
    try:
        skeleton = meta_model(d / "model", max_bytes=limit,
                              modules=set(plan_json["module_map"].values()))
    except ArtifactError:
        raise
    except Exception as e:  # transformers raises many types on a config it cannot build
        raise ArtifactError(f"artifact {d}: cannot rebuild the model from model/config.json: "
                            f"{type(e).__name__}: {str(e)[:200]}") from None
    if meta["mode"] == "generate" and not same_model \
            and meta["max_cache_len"] > max_positions(skeleton):
        raise ArtifactError(f"artifact {d}: qdsl_artifact.json: max_cache_len "
                            f"{meta['max_cache_len']} exceeds the model's "
                            f"{max_positions(skeleton)} positions (model/config.json)")
    with artifact_errors(d, "the model of model/config.json cannot be captured"):
        captured = capture(skeleton, mode=meta["mode"], max_cache_len=meta["max_cache_len"],
                           batch_size=batch_size)
        named = name_graph(captured)
    plan = plan_of(d, meta, plan_json, named, same_model=same_model)
    gm = captured.gm
    _to_meta(gm)
    del skeleton, captured
    # weight scales are stored in the runtime modules; the passes only need their shapes
    tensors = {**tensors, **{k: torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
                             for k, (shape, dtype) in info["weight_qparams"].items()}}
    with artifact_errors(d, "the quantizers (quant_params.safetensors, int8.weight_qparams) "
                            "do not fit the model of model/config.json"):
        on_meta = Frozen.from_state(meta["quantizers"],
                                    {k: t.to("meta") for k, t in tensors.items()})
        with warnings.catch_warnings():  # fallbacks were reported when compiling
            warnings.simplefilter("ignore")
            ctx = PassContext(named, plan, frozen=on_meta, fallback=info["fallback"],
                              lower_compute=meta["settings"].get("lower_compute"),
                              kv_cache=meta["settings"].get("lower_kv_cache"))
            gm = run(INT8, gm, ctx)
            named = ctx.named  # a transform may have untied a weight
    _fill(d, gm, info)
    tok = tokenizer(d / "model")
    recipe = Recipe.from_json(meta["recipe"]["rules"],
                              text=(d / "recipe.qrec").read_text(encoding="utf-8"))
    return QuantizedModel(gm, named=named, plan=plan, recipe=recipe,
                          frozen=Frozen.from_state(meta["quantizers"], tensors),
                          lower="int8", mode=meta["mode"], max_cache_len=meta["max_cache_len"],
                          source_id=meta["model"]["id"], source_hash=meta["model"]["hash"],
                          settings=Settings(**meta["settings"]), tokenizer=tok,
                          model_config=gm_config(d / "model"), fallback=info["fallback"],
                          batch_size=batch_size)


def _fill(d: Path, gm: torch.fx.GraphModule, info: dict,
          source: str = "the model in model/config.json") -> None:
    """Assign ``model.safetensors`` to the lowered graph ``gm`` (built on the meta device
    from ``source``, for messages), after checking each tensor against the graph;
    run-time state is zeros."""
    # tensors at the file's offsets can be 8-byte aligned; aten._weight_int8pack_mm
    # (Int8WeightOnlyLinear, 2..4 rows) segfaults on an int8 weight not 16-byte aligned
    # with 4 rows: a 4-token prompt or a batch of 4. A copy is 64-byte aligned.
    stored = {k: v if v.data_ptr() % 64 == 0 else v.clone()
              for k, v in read_safetensors(d, "model.safetensors").items()}
    for k, v in info["aliases"].items():
        if v not in stored:
            raise ArtifactError(f"artifact {d}: qdsl_artifact.json: alias {k} names tensor {v}, "
                                "which model.safetensors does not hold")
        stored[k] = stored[v]
    state = set(info["runtime_state"])
    expected = _check_shapes(d, gm, stored, state, source)
    # run-time state (key/value cache, counters) is not stored: zeros, in the same assignment
    stored.update({k: torch.zeros(t.shape, dtype=t.dtype) for k, t in expected.items()
                   if k in state})
    with artifact_errors(d, "model.safetensors does not fit the model"):
        assign_tensors(gm, stored)
    missing = [k for k, t in graph_tensors(gm).items() if t.is_meta]
    if missing:
        raise ArtifactError(f"artifact {d}: tensors missing from model.safetensors: {missing[:5]}")


def stored_graph(d: Path, meta: dict, max_cache_len: int | None = None,
                 batch_size: int = 1) -> torch.fx.GraphModule | None:
    """The lowered graph of a self-contained int8 artifact read from its ``graph.json``
    (``qdsl.compiler.graphfile``), its tensors assigned: no model rebuilt, no capture, no
    passes. None when the artifact has no stored graph or asks for another cache length
    or batch size than the stored graph's (then it loads by capture)."""
    if not (meta["lower"] == "int8" and meta["int8"]["self_contained"]
            and (d / GRAPH_FILE).exists()):
        return None
    doc = read_json(d, GRAPH_FILE)
    if isinstance(doc, dict) and (
            doc.get("max_cache_len") != (max_cache_len or meta["max_cache_len"])
            or doc.get("batch_size") != batch_size or doc.get("mode") != meta["mode"]):
        return None
    gm = graphfile.from_json(doc, str(d))
    _fill(d, gm, meta["int8"], source=GRAPH_FILE)
    return gm


def _check_shapes(d: Path, gm, stored: dict[str, torch.Tensor], state: set[str],
                  source: str) -> dict[str, torch.Tensor]:
    """Each tensor the lowered graph reads is stored with the shape and dtype the
    graph built from model/config.json expects (a config edited after the compile,
    or a tensor swapped, is refused before anything is assigned); it holds no tensor
    the graph does not read (a renamed key would be assigned to a module that does
    not exist). Returns the graph's tensors (on the meta device: shapes and dtypes)."""
    expected = graph_tensors(gm)
    unknown = sorted(set(stored) - set(expected))
    if unknown:
        raise ArtifactError(f"artifact {d}: model.safetensors: tensor {unknown[0]} is not one "
                            f"{source} reads"
                            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    for k, want in expected.items():
        got = stored.get(k)
        if k in state or got is None:
            continue
        if got.shape != want.shape or got.dtype != want.dtype:
            raise ArtifactError(
                f"artifact {d}: model.safetensors: tensor {k} is {list(got.shape)} "
                f"{got.dtype}; {source} needs {list(want.shape)} "
                f"{want.dtype}")
    return expected


def gm_config(config_dir: Path):
    return AutoConfig.from_pretrained(config_dir, local_files_only=True)


def tokenizer(model_dir: Path):
    if not any(model_dir.glob("tokenizer*")):
        return None
    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # tokenizers and transformers raise many types on damaged files
        raise ArtifactError(f"artifact {model_dir.parent}: the tokenizer in model/ cannot be "
                            f"loaded: {type(e).__name__}: {str(e)[:200]}") from None
