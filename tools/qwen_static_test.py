"""Test of docs/results-qwen.md's static per-tensor explanation: compile each recipe on
qwen2.5-coder-0.5b with CALIB calibration windows and score perplexity on the sweep's 16
windows (stdlib, seed 0, 256 tokens), saving per-window losses for paired ratios.

    python tools/qwen_static_test.py CALIB OUT.json RECIPE...
"""
import json, sys, time
import torch
torch.set_num_threads(1)
import qdsl
from qdsl.lang import load_recipe
from qdsl.models.zoo import load_model
from qdsl.eval.samples import load_bench
from qdsl.eval.complete import score_perplexity
from qdsl.study.jobs import SweepConfig, effective_settings, cache_len
from qdsl.atomic import write_json_atomic

calib = int(sys.argv[1])
out = sys.argv[2]
model, tok = load_model("qwen2.5-coder-0.5b", require_causal=True)
cfg = SweepConfig(model="qwen2.5-coder-0.5b", n=16, ppl_windows=16, calib_samples=calib)
samples = load_bench("stdlib", 16, 0)
cache = cache_len(cfg, 32768)
res = {"calib_samples": calib, "cache": cache, "cpu": torch.backends.cpu.get_cpu_capability(),
       "threads": torch.get_num_threads(), "rows": {}}
for path in sys.argv[3:]:
    r = load_recipe(path)
    st = effective_settings(r, cfg)
    t = time.time()
    qm = qdsl.compile(model, r, tokenizer=tok, settings=st, lower="fake", max_cache_len=cache,
                      fallback="simulate", progress=True)
    tc = time.time() - t
    p = score_perplexity(qm.lm(), tok, samples, 16, 256, max_positions=cache - 1, progress=True)
    res["rows"][path] = {"compile_seconds": round(tc, 1), "ppl": p["ppl"],
                         "window_nll": p["window_nll"], "window_tokens": p["window_tokens"],
                         "settings": st.to_json(), "ppl_seconds": p["seconds"],
                         "loadavg": open("/proc/loadavg").read().split()[:3]}
    write_json_atomic(out, res)
    print(path, p["ppl"], tc, flush=True)
    del qm
