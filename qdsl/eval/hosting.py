"""Hosting metrics (Wei et al. 2023, Table 2): file size, peak memory, prefill
latency, decode latency per token, tokens/s, and an energy / cost estimate,
for the fp32 model, ``torch.ao`` ``quantize_dynamic`` (the peer to beat) and a
qdsl model, all in one run.

Every model is measured in a fresh subprocess (``python -m qdsl.eval.hosting CHILD``)
so peak resident memory (``ru_maxrss``) belongs to that model alone. Latencies
are medians over ``repeats`` runs after a warm-up; decode is per token at batch
1 with a key/value cache (``CausalLM.prefill`` / ``decode``). The report (``cost``,
``markdown``, ``plot``) is ``qdsl.eval.hosting_report``, re-exported here.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from transformers import AutoConfig, GPT2Config, GPT2LMHeadModel

from qdsl.errors import ArtifactError, ModelError
from qdsl.eval import hosting_hw
from qdsl.eval.hosting_report import cost, markdown, plot  # noqa: F401 (re-exported)
from qdsl.graph.capture import capture
from qdsl.models import zoo
from qdsl.models.limits import DEFAULT_MAX_CACHE_LEN, Limit, fit_length, model_limit
from qdsl.models.lm import HFCausalLM
from qdsl.passes.pipeline import FLOAT_RUNTIME, PassContext, run
from qdsl.runtime.conv1d import conv1d_to_linear, is_conv1d
from qdsl.runtime import kernels
from qdsl.runtime.fused import decode_step
from qdsl.runtime.graphlm import GraphLM
from qdsl.runtime.swap import load_lowered, save_lowered, swap_linears

log = logging.getLogger(__name__)

RANDOM_GPT2 = "gpt2-124m-random"  # GPT2LMHeadModel(GPT2Config()), seeded: speed work
DEFAULT_WATTS = 65.0    # assumed package power of the CPU while generating
DEFAULT_PRICE = 0.15    # assumed $ per kWh
PRED_TOKENS = 20        # tokens generated per prediction (Wei et al. Table 2)
GRAPH_CACHE_LEN = DEFAULT_MAX_CACHE_LEN  # static cache of the fp32 graph row (as qdsl compile)
DEFAULT_CONTEXT = 512   # prefill tokens, clipped to the model (fit_config)


@dataclass(frozen=True)
class BenchConfig:
    context: int | None = None   # prefill tokens; None: DEFAULT_CONTEXT fitted to the model
    decode_tokens: int = 32
    repeats: int = 5
    threads: int = 1
    rounds: int = 2         # every model measured this often, rounds in alternating order
    power_watts: float = DEFAULT_WATTS
    price_per_kwh: float = DEFAULT_PRICE
    pred_tokens: int = PRED_TOKENS

    def __post_init__(self):
        for k in ("decode_tokens", "repeats", "threads", "rounds", "pred_tokens"):
            assert getattr(self, k) >= 1, (k, self)
        assert self.context is None or self.context >= 1, self
        assert self.power_watts > 0 and self.price_per_kwh >= 0, self


def fit_config(model_name: str, cfg: BenchConfig) -> BenchConfig:
    """``cfg`` with a context that fits the float model's positions together with the
    decode steps and the graph rows' spare cache slot (graphs run cache - 1 tokens):
    stdlib-gpt2 (256 positions), 32 decode tokens -> context 223. A context left
    unset is clipped with a warning; a given one that does not fit is an OptionError."""
    if model_name == RANDOM_GPT2:
        n = GPT2Config().n_positions
        limit = Limit(n, f"{RANDOM_GPT2} has {n} positions")
    else:
        limit = model_limit(model_name)
    fit_length("--decode-tokens", cfg.decode_tokens, cfg.decode_tokens, limit, reserve=2,
               reserved_for="one prompt token and the graph's spare cache slot")
    context = fit_length("--context", cfg.context, DEFAULT_CONTEXT, limit,
                         reserve=cfg.decode_tokens + 1,
                         reserved_for=f"{cfg.decode_tokens} decode tokens and the graph's "
                                      "spare cache slot")
    return replace(cfg, context=context)


@dataclass
class Row:
    """One measured model. Times in milliseconds, sizes in MB (10^6 bytes)."""

    name: str
    kind: str
    size_mb: float | None
    rss_load_mb: float
    peak_rss_mb: float
    prefill_ms: float
    decode_ms: float
    tokens_per_s: float
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------
# Loading (parent and child).


def load_float(name: str):
    """float32 eval model: a short name or directory (``qdsl.models``), or RANDOM_GPT2."""
    if name == RANDOM_GPT2:
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config()).eval()
    # the class the checkpoint declares; an encoder or missing weights: ModelError
    return zoo.load_model(name, attn=None, require_causal=True, tokenizer=False)[0]


def _quantize_dynamic(model):
    with warnings.catch_warnings():  # torch warns that quantized tensors are deprecated
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8,
                                                      inplace=True)


def _compiled(lm: GraphLM, spec: dict) -> GraphLM:
    """The graph's decode step compiled (``qdsl.runtime.compiled``) where the row asks."""
    lm.step = decode_step(lm.gm, spec["name"]) if spec.get("compile_decode") else None
    return lm


def _load_child_model(spec: dict):
    """The model a child measures -> (CausalLM, vocab size)."""
    kind, path = spec["kind"], spec["path"]
    if kind == "artifact":
        try:
            from qdsl.compiler.loading import load_artifact_lm
        except ImportError as e:
            raise ArtifactError("qdsl.compiler is not available in this build; "
                                "use --lower-all to measure the runtime modules") from e
        lm = load_artifact_lm(path, max_cache_len=spec.get("cache_len"),
                              verify=spec.get("verify", True))
        return _compiled(lm, spec), spec["vocab"]
    model = load_lowered(path)                               # fp32 or swapped, meta + assign
    if kind == "fp32-graph":          # the runtime an int8 artifact runs, float weights

        cache = spec.get("cache_len", GRAPH_CACHE_LEN)
        gm = run(FLOAT_RUNTIME, capture(model, mode="generate", max_cache_len=cache).gm,
                 PassContext())  # what INT8 runs after lowering, on float weights
        return _compiled(GraphLM(gm, cache, name=spec["name"]), spec), model.config.vocab_size
    if kind == "torch-ao":
        model = _quantize_dynamic(model)
    elif kind == "torch-ao-linear":
        model = _quantize_dynamic(conv1d_to_linear(model))
    return HFCausalLM(model, spec["name"]), model.config.vocab_size


# --------------------------------------------------------------------------
# The child: measure one model.


def _rss_mb() -> float:
    """Current resident set size (Linux /proc), MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def _maxrss_mb() -> float:
    """Peak resident set size of this process image, MB.

    ``ru_maxrss`` survives fork + exec on Linux (a child reports its parent's peak
    if that was higher), so prefer ``VmHWM``, which starts afresh at exec.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6     # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6  # KiB on Linux


def measure(lm, vocab: int, cfg: BenchConfig) -> dict:
    """Prefill ms (median), decode ms per token (median of per-run medians)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, cfg.context), generator=g)
    # warm-up, using no more cache slots than the timed runs (context + decode tokens)
    lm.prefill(ids[:, :min(8, cfg.context)])
    for _ in range(min(3, cfg.decode_tokens)):
        lm.decode(1)
    prefill, decode = [], []
    for _ in range(cfg.repeats):
        t0 = time.perf_counter()
        logits = lm.prefill(ids)
        prefill.append(time.perf_counter() - t0)
        steps = []
        for _ in range(cfg.decode_tokens):
            tok = int(logits.argmax())
            t0 = time.perf_counter()
            logits = lm.decode(tok)
            steps.append(time.perf_counter() - t0)
        decode.append(statistics.median(steps))
    return {"prefill_ms": 1e3 * statistics.median(prefill),
            "decode_ms": 1e3 * statistics.median(decode),
            "prefill_all_ms": [1e3 * t for t in prefill],
            "decode_all_ms": [1e3 * t for t in decode]}


def child_main(spec: dict) -> dict:
    cfg = BenchConfig(**spec["config"])
    torch.set_num_threads(cfg.threads)
    base = _rss_mb()
    lm, vocab = _load_child_model(spec)
    out = {"rss_base_mb": base, "rss_load_mb": _rss_mb(), "peak_load_mb": _maxrss_mb()}
    out.update(measure(lm, vocab, cfg))
    out["peak_rss_mb"] = _maxrss_mb()
    module = hosting_hw.module_of(lm)
    out["weight_bytes_per_token"] = None if module is None else \
        hosting_hw.weight_bytes_per_token(module)
    kv = None if module is None else hosting_hw.kv_cache_of(module)
    if kv is not None:   # the mean filled cache a timed decode step reads
        out["kv_bytes_per_token"] = kv[0] * (cfg.context + (cfg.decode_tokens + 1) / 2)
        out["kv_dtype"] = kv[1]
    out["bandwidth_gbs"] = hosting_hw.read_bandwidth_gbs(cfg.threads)   # same process, threads
    out["kernels"] = {k: v["kernel"] for k, v in kernels.report(measure=False)["kernels"].items()}
    step = getattr(lm, "step", None)
    if step is not None:   # first decode step = trace + compile (or cache load) + one step
        out["compile_s"], out["compile_failed"] = step.compile_s, step.failed
        out["huge_pages_mb"] = round(step.moved.nbytes / 2**20, 1)
        out["wrapper"] = step.wrapper
    return out


def _run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "qdsl.eval.hosting"], input=json.dumps(spec),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise ModelError(f"benchmark of {spec['name']} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------
# The parent: prepare files, run children, tabulate.


def dir_size_mb(path: str | os.PathLike) -> float:
    p = Path(path)
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) / 1e6


def _saved_size_mb(module, work: Path, name: str) -> float:
    f = work / f"{name}.pt"
    torch.save(module.state_dict(), f)
    return dir_size_mb(f)


def prepare(model_name: str, lower_all: str | None, work: Path) -> list[dict]:
    """Write the files the children load; return their specs (without config)."""
    model = load_float(model_name)
    fp32_dir = save_lowered(model, "fp32", work / "fp32")
    n_params = sum(p.numel() for p in model.parameters())
    has_conv1d = any(is_conv1d(m) for m in model.modules())
    fp32_mb = dir_size_mb(fp32_dir / "model.safetensors")
    specs = [dict(name="fp32", kind="fp32", path=str(fp32_dir), size_mb=fp32_mb,
                  extra={"params": n_params, "fp16_size_mb": 2 * n_params / 1e6}),
             dict(name="fp32 graph (static cache, fused attention, as qdsl runs)", kind="fp32-graph",
                  path=str(fp32_dir), size_mb=fp32_mb)]
    ao = _quantize_dynamic(model)
    specs.append(dict(name="torch.ao quantize_dynamic" + (" (Conv1D left float)"
                                                          if has_conv1d else ""),
                      kind="torch-ao", path=str(fp32_dir),
                      size_mb=_saved_size_mb(ao, work, "ao")))
    if has_conv1d:
        model = load_float(model_name)
        ao = _quantize_dynamic(conv1d_to_linear(model))
        specs.append(dict(name="torch.ao quantize_dynamic (Conv1D -> Linear)",
                          kind="torch-ao-linear", path=str(fp32_dir),
                          size_mb=_saved_size_mb(ao, work, "ao_linear")))
    del ao
    if lower_all:
        model = load_float(model_name)
        d = save_lowered(swap_linears(model, lower_all), lower_all, work / lower_all)
        specs.append(dict(name=f"qdsl {lower_all} (swap_linears)", kind="lowered",
                          path=str(d), size_mb=dir_size_mb(d / "model.safetensors")))
    return specs


def run_bench(model_name: str, *, artifact: str | None = None, lower_all: str | None = None,
              cfg: BenchConfig = BenchConfig(), work_dir: str | None = None,
              verify: bool = True, llamacpp: str | None = None,
              gguf: tuple[str, ...] = (), compile_decode: bool = False,
              also: tuple[str, ...] = ()) -> dict:
    """Measure fp32, quantize_dynamic, and the artifact / lowered model -> result dict.
    ``also``: further artifacts of the same float model, measured in the same run
    (interleaved with the others, so their ratios share the run's load).
    ``verify``: the artifact's child checks its files' recorded sha256 (``qdsl.load``).
    ``llamacpp`` (a ``llama-bench`` binary) with ``gguf`` files adds llama.cpp's rows.
    ``compile_decode``: each graph row (fp32 graph, artifact) also runs with its decode
    step compiled (``qdsl.runtime.compiled``), as a row of its own."""
    artifacts = ([artifact] if artifact else []) + list(also)
    for a in artifacts:
        if not (Path(a) / "qdsl_artifact.json").exists():
            raise ArtifactError(f"{a}: not a qdsl artifact (no qdsl_artifact.json)")
    names = [Path(a).resolve().name for a in artifacts]
    if len(set(names)) < len(names):     # rows are named after the directory
        names = [str(a) for a in artifacts]
    hosting_hw.check_llamacpp(llamacpp, list(gguf))
    cfg = fit_config(model_name, cfg)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        specs = prepare(model_name, lower_all, Path(tmp))
        if artifacts:
            vocab = AutoConfig.from_pretrained(specs[0]["path"]).vocab_size
            # the artifacts' own cache, or room for the prompt and the decoded tokens (a
            # sweep compiles with 305 slots); every graph row runs the same length
            cache = max([cfg.context + cfg.decode_tokens + 1] + [
                json.loads((Path(a) / "qdsl_artifact.json").read_text())
                .get("max_cache_len", GRAPH_CACHE_LEN) for a in artifacts])
            for a, name in zip(artifacts, names):
                specs.append(dict(name=f"qdsl artifact {name}", kind="artifact", path=str(a),
                                  size_mb=dir_size_mb(a), vocab=vocab, cache_len=cache,
                                  verify=verify))
            specs[1]["cache_len"] = cache
        if compile_decode:
            specs += [{**s, "name": s["name"] + ", compiled decode", "compile_decode": True}
                      for s in specs if s["kind"] in ("fp32-graph", "artifact")]
        runs: dict[int, list[dict]] = {i: [] for i in range(len(specs))}
        for k in range(cfg.rounds):                          # interleave: load drifts
            order = range(len(specs)) if k % 2 == 0 else reversed(range(len(specs)))
            for i in order:
                log.info("measuring %s (round %d)", specs[i]["name"], k + 1)
                runs[i].append(_run_child({**specs[i], "config": asdict(cfg)}))
        rows = [asdict(_row(spec, runs[i])) for i, spec in enumerate(specs)]
    if llamacpp:
        log.info("measuring llama.cpp (%d GGUF file(s))", len(gguf))
        rows += hosting_hw.llamacpp_rows(llamacpp, list(gguf), cfg.context, cfg.decode_tokens,
                                         cfg.threads, cfg.repeats)
    return {"model": model_name, "config": asdict(cfg), "conditions": conditions(cfg),
            "rows": rows}


def _row(spec: dict, runs: list[dict]) -> Row:
    """Medians over every repeat of every round; memory from the first round; the
    decode bandwidth bound from the bytes a step reads and the highest bandwidth the
    row's children measured (``hosting_hw.read_bandwidth_gbs``: the strictest bound)."""
    pre = statistics.median(t for r in runs for t in r["prefill_all_ms"])
    dec = statistics.median(t for r in runs for t in r["decode_all_ms"])
    bw = max(r["bandwidth_gbs"] for r in runs)
    nbytes = runs[0].get("weight_bytes_per_token")
    bound = {} if not nbytes else {"weight_bytes_per_token": nbytes, "bandwidth_gbs": bw,
                                   "bound_ms": nbytes / (bw * 1e9) * 1e3}
    bound.update({k: runs[0][k] for k in ("kv_bytes_per_token", "kv_dtype") if k in runs[0]})
    return Row(spec["name"], spec["kind"], spec["size_mb"], runs[0]["rss_load_mb"],
               max(r["peak_rss_mb"] for r in runs), pre, dec, 1e3 / dec,
               {**spec.get("extra", {}), **bound, "kernels": runs[0].get("kernels", {}),
                "runs": runs})


def conditions(cfg: BenchConfig) -> dict:
    """torch, threads, CPUs, load, and the capability the kernels were chosen for
    (the bandwidth is measured in each child: ``Row.extra``)."""
    return {"torch": torch.__version__, "threads": cfg.threads, "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
            "load_avg": os.getloadavg(), **hosting_hw.machine(cfg.threads, bandwidth=False)}


if __name__ == "__main__":  # the child process: a JSON spec on stdin, a JSON line out
    from qdsl.errors import QdslError

    try:
        print(json.dumps(child_main(json.loads(sys.stdin.read()))))
    except QdslError as e:  # a user's error (a damaged artifact): its line, no traceback
        print(e.format(), file=sys.stderr)
        sys.exit(2)
