"""Load a self-contained ``--lower int8`` artifact without a float detour (gpt-fast style).

    config.json --meta device--> model --to_empty--> capture --params to meta-->
    lower_fake + lower_int8 (structure only) --assign--> stored integer tensors

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
from safetensors.torch import load_file

from .artifact import assign_tensors, graph_tensors
from .errors import ArtifactError


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


def meta_model(config_dir: Path) -> torch.nn.Module:
    """The source architecture from its config.json, parameters uninitialised (never touched)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .models import checkpoint_architecture

    # the class the config declares: an encoder is rebuilt without an LM head
    auto = AutoModelForCausalLM if checkpoint_architecture(config_dir).causal else AutoModel

    config = AutoConfig.from_pretrained(config_dir)
    with torch.device("meta"):
        model = auto.from_config(config, attn_implementation="eager")
    model = model.to_empty(device="cpu")  # to_empty unties shared tensors: tie them again
    model.tie_weights()
    return model.eval()


def load_int8(path, meta: dict, plan_json: dict, tensors: dict[str, torch.Tensor], model=None,
              same_model: bool = False):
    """``qdsl.load`` for a self-contained int8 artifact -> QuantizedModel. ``same_model``:
    ``meta`` asks for another cache length than the compile's (``QuantPlan.check_graph``)."""
    from .capture import capture
    from .compiler import QuantizedModel, as_model, check_source
    from .naming import name_graph
    from .passes.freeze import Frozen
    from .passes.lower_fake import lower_fake
    from .passes.lower_int8 import lower_int8
    from .plan import QuantPlan
    from .recipe import Recipe, Settings

    d, info = Path(path), meta["int8"]
    if model is not None:  # optional: must be the model the artifact was compiled from
        check_source(as_model(model)[0], meta, d)
    try:
        skeleton = meta_model(d / "model")
    except (OSError, ValueError) as e:
        raise ArtifactError(f"artifact {d}: cannot rebuild the model from model/config.json: "
                            f"{e}") from e
    captured = capture(skeleton, mode=meta["mode"], max_cache_len=meta["max_cache_len"])
    named = name_graph(captured)
    plan = QuantPlan.from_json(plan_json)
    plan.check_graph(named, same_model=same_model)
    gm = captured.gm
    _to_meta(gm)
    del skeleton, captured
    # weight scales are stored in the runtime modules; the passes only need their shapes
    tensors = {**tensors, **{k: torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
                             for k, (shape, dtype) in info.get("weight_qparams", {}).items()}}
    on_meta = Frozen.from_state(meta["quantizers"], {k: t.to("meta") for k, t in tensors.items()})
    with warnings.catch_warnings():  # fallbacks were reported when compiling
        warnings.simplefilter("ignore")
        gm = lower_int8(lower_fake(gm, named, plan, on_meta), named, plan, on_meta,
                        fallback=info["fallback"], compute=meta["settings"].get("lower_compute"))
    stored = load_file(str(d / "model.safetensors"))
    stored.update({k: stored[v] for k, v in info["aliases"].items()})
    assign_tensors(gm, stored)
    for k, t in graph_tensors(gm).items():
        if k in info["runtime_state"]:
            assign_tensors(gm, {k: torch.zeros(t.shape, dtype=t.dtype)})
    missing = [k for k, t in graph_tensors(gm).items() if t.is_meta]
    if missing:
        raise ArtifactError(f"artifact {d}: tensors missing from model.safetensors: {missing[:5]}")
    tok = _tokenizer(d / "model")
    recipe = Recipe.from_json(meta["recipe"]["rules"], text=(d / "recipe.qrec").read_text())
    return QuantizedModel(gm, named=named, plan=plan, recipe=recipe,
                          frozen=Frozen.from_state(meta["quantizers"], tensors),
                          lower="int8", mode=meta["mode"], max_cache_len=meta["max_cache_len"],
                          source_id=meta["model"]["id"], source_hash=meta["model"]["hash"],
                          settings=Settings(**meta["settings"]), tokenizer=tok,
                          model_config=gm_config(d / "model"), fallback=info["fallback"])


def gm_config(config_dir: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(config_dir)


def _tokenizer(model_dir: Path):
    if not any(model_dir.glob("tokenizer*")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
