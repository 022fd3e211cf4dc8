"""``qdsl bench``: hosting metrics against fp32 and torch.ao quantize_dynamic."""

from __future__ import annotations

import argparse

from qdsl.atomic import write_json_atomic
from qdsl.cli.names import COMMANDS
from qdsl.errors import OptionError

from ..args import MAX_THREADS, int_range, nonneg_float, output_file, positive_float, positive_int


def register(sub) -> None:
    p = sub.add_parser(
        "bench", help=COMMANDS["bench"],
        description="Measure file size, peak memory, prefill latency and decode latency per "
                    "token (batch 1, KV cache) of the fp32 model, torch.ao quantize_dynamic "
                    "and a qdsl artifact (or --lower-all), each in a fresh process; print a "
                    "markdown table with ratios to fp32 and a cost view (Wei et al. Table 2); "
                    "records the CPU capability, threads and read bandwidth, and reports "
                    "decode against its bandwidth bound and the kernels the qdsl rows ran.")
    p.add_argument("model", metavar="MODEL_OR_ARTIFACT",
                   help="short name (smollm2-135m, stdlib-gpt2, gpt2-124m-random), model "
                        "directory, or artifact directory (contains qdsl_artifact.json)")
    p.add_argument("--baseline", metavar="MODEL",
                   help="float model of an artifact (default: recorded in the artifact)")
    p.add_argument("--lower-all", choices=("w8a8-dynamic", "w8-weight-only", "w4"),
                   help="swap every linear (and Conv1D, embedding) of the eager model for "
                        "qdsl runtime modules and measure that")
    p.add_argument("--context", type=positive_int, default=None,
                   help="prefill length in tokens (default 512, clipped with a note so that "
                        "context + decode tokens + 1 fit the model's positions: 223 on "
                        "stdlib-gpt2; a larger explicit value is an error)")
    p.add_argument("--decode-tokens", type=positive_int, default=32,
                   help="decode steps per repeat (default 32)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed repeats (default 5)")
    p.add_argument("--threads", type=int_range(1, MAX_THREADS), default=1,
                   help="torch threads (default 1)")
    p.add_argument("--rounds", type=positive_int, default=2,
                   help="measure every model this often, interleaved (default 2)")
    p.add_argument("--json", metavar="FILE", type=output_file(".json"),
                   help="write the results to a .json file")
    p.add_argument("--plot", metavar="FILE.png", type=output_file(".png", ".svg"),
                   help="plot size against decode latency (.png or .svg)")
    p.add_argument("--power-watts", type=positive_float, default=None,
                   help="assumed power for the cost view (default 65)")
    p.add_argument("--price-per-kwh", type=nonneg_float, default=None,
                   help="assumed $/kWh for the cost view (default 0.15)")
    p.add_argument("--no-verify", action="store_true",
                   help="load an artifact even if its files do not match the sha256 "
                        "recorded at compile time (damaged or edited); the format checks "
                        "still run")
    p.add_argument("--llamacpp", metavar="LLAMA_BENCH",
                   help="a llama.cpp llama-bench binary: also run it on the --gguf files "
                        "(same context, decode tokens, threads and repeats) and add its rows "
                        "(tools/build_llamacpp.py builds one)")
    p.add_argument("--gguf", metavar="FILE", action="append", default=[],
                   help="a GGUF file for --llamacpp (repeat for several, e.g. F32, Q8_0, Q4_0)")
    p.add_argument("--also", metavar="ARTIFACT", action="append", default=[],
                   help="another artifact of the same float model, measured in the same run "
                        "(interleaved with the other rows, so their ratios share the run's "
                        "load; repeat for several), e.g. a recipe with and without `rotate`")
    p.add_argument("--compile-decode", action="store_true",
                   help="also measure the fp32 graph and the artifact with their decode step "
                        "compiled, as extra rows: a w8a8 / w4a8 LLaMA / Qwen2 artifact as one "
                        "fused C++ call a step (llama_decode_step, checked against the graph on "
                        "its first step), anything else with torch.compile / inductor "
                        "(static shapes; the first step compiles, cached under the qdsl "
                        "cache dir; eager if it fails)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qdsl.eval import hosting as bench
    from qdsl.artifact.store import is_artifact, read_artifact
    from qdsl.compiler.source import local_source

    cfg = bench.BenchConfig(
        context=args.context, decode_tokens=args.decode_tokens, repeats=args.repeats,
        threads=args.threads, rounds=args.rounds,
        power_watts=bench.DEFAULT_WATTS if args.power_watts is None else args.power_watts,
        price_per_kwh=bench.DEFAULT_PRICE if args.price_per_kwh is None else args.price_per_kwh)
    model, artifact = args.model, None
    if is_artifact(args.model):  # checked (one line if damaged) before anything is loaded
        artifact = args.model
        meta, _, _ = read_artifact(artifact, verify=not args.no_verify)
        model = args.baseline or local_source(meta["model"]["id"], artifact)
    elif args.baseline:
        model = args.baseline
    if args.also and artifact is None:
        raise OptionError("--also: give the first artifact as MODEL_OR_ARTIFACT")
    for other in args.also:
        if not is_artifact(other):
            raise OptionError(f"--also {other}: not a qdsl artifact (no qdsl_artifact.json)")
        other_meta, _, _ = read_artifact(other, verify=not args.no_verify)
        if not args.baseline and other_meta["model"]["id"] != meta["model"]["id"]:
            raise OptionError(f"--also {other}: compiled from {other_meta['model']['id']}, not "
                            f"{meta['model']['id']} (the first artifact's model); pass "
                            "--baseline MODEL to compare them anyway")
    result = bench.run_bench(model, artifact=artifact, lower_all=args.lower_all, cfg=cfg,
                             verify=not args.no_verify, llamacpp=args.llamacpp,
                             gguf=tuple(args.gguf), compile_decode=args.compile_decode,
                             also=tuple(args.also))
    print(bench.markdown(result))
    if args.json:
        write_json_atomic(args.json, result)
    if args.plot:
        bench.plot(result, args.plot)
    return 0
