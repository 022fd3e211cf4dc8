"""qdsl compile RECIPE --model MODEL --calib DATA [--lower fake|int8] -o OUT."""

from __future__ import annotations

import sys

from ...atomic import ARTIFACT, output_dir as claim_output
from ...compiler import autostream
from ...compiler.memtrace import MemTrace, summary
from ...config.recipe import Settings
from ...errors import OptionError
from ...models.zoo import resolve_model
from ..names import COMMANDS
from ..args import add_artifact_out, add_recipe_model, int_range, positive_int, seed_int


def register(sub) -> None:
    p = sub.add_parser(
        "compile", help=COMMANDS["compile"],
        description="Capture MODEL, match RECIPE, calibrate static activation quantizers "
                    "(and the input statistics of gptq / awq weights) on DATA, round, freeze "
                    "and lower; write an artifact directory (safetensors + JSON) "
                    "that `qdsl eval`, `qdsl bench` and qdsl.load() read back without "
                    "calibrating again. Settings given here override the recipe's `set` lines.")
    add_recipe_model(p, "short name, local checkpoint dir, or hub id")
    p.add_argument("--calib", metavar="DATA",
                   help="calibration data: a directory of source files, a dataset saved with "
                        "datasets' save_to_disk, or 'stdlib' (default: the recipe's calib.data)")
    p.add_argument("--samples", type=positive_int,
                   help="calibration windows (calib.samples; default 128)")
    p.add_argument("--seq-len", type=int_range(2), metavar="N",
                   help="tokens per window (calib.seq_len; default 256, clipped with a note to "
                        "what the captured graph takes: 255 on stdlib-gpt2; a larger value "
                        "given here or in the recipe is an error)")
    p.add_argument("--seed", type=seed_int, help="window sampling seed (calib.seed; default 0)")
    p.add_argument("--lower", choices=["fake", "int8"],
                   help="fake: simulation at any bit width; int8: real integer kernels "
                        "(default: the recipe's `lower`, else fake)")
    p.add_argument("--fallback", choices=["error", "simulate"], default="error",
                   help="--lower int8: what to do with a quantized op that has no integer kernel "
                        "(w3, asymmetric weights, a4 inputs, per-group activations): error "
                        "(default) or keep it as fake-quant simulation, reported")
    p.add_argument("--max-cache-len", type=int_range(2), default=None, metavar="N",
                   help="key/value cache slots of the generate graph, which runs N - 1 tokens "
                        "(context + new tokens; default 1024, clipped with a note to the "
                        "model's positions; a larger value is an error)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--stream", action="store_true", default=None,
                      help="read the float weights block by block from the model's safetensors "
                           "checkpoint, calibrate and freeze one block at a time: peak memory "
                           "about one block plus the embedding and the calibration activations, "
                           "the same artifact (gptq / awq rounded block by block; --lower fake; "
                           "no rotate / smooth / student.blocks; docs/scale.md). Without "
                           "--stream or --no-stream the compile streams by itself, saying so, "
                           "when the in-memory compile (about 3.5x the float32 weights + 1 GiB) "
                           "would not fit in the memory available (MemAvailable, the memory "
                           "cgroup's limit)")
    mode.add_argument("--no-stream", dest="stream", action="store_false", default=None,
                      help="compile in memory, however large the model")
    p.add_argument("--calib-checkpoint", metavar="FILE",
                   help="save the calibration's state to FILE every two minutes and resume "
                        "from it: after an interruption, the same command carries on from "
                        "the windows FILE holds (another model, recipe, data or settings "
                        "start over, with a warning); FILE is removed when calibration "
                        "ends. Size: ~2 MiB per mse / percentile observer, in^2 floats per "
                        "gptq / awq linear input. Not with --stream")
    p.add_argument("--trace-memory", metavar="FILE",
                   help="debug: write the resident memory (now, and the peak since the "
                        "previous step) at each step of the compile to FILE, one JSON "
                        "line a step (per stage when streamed, else compile and save; "
                        "docs/scale.md)")
    add_artifact_out(p, "replace OUT if it is a qdsl artifact (one holding anything else, "
                        "or any other file or directory, is refused)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ...artifact.store import artifact_size
    from ...compiler.build import compile

    overrides = Settings(calib_samples=args.samples, calib_seq_len=args.seq_len,
                         calib_seed=args.seed, lower=args.lower)
    # claim OUT before any work: a busy, foreign or existing OUT is refused now, not
    # after calibrating; the claim (lock) is held until the artifact is in place
    with claim_output(args.out, ARTIFACT, force=args.force):
        if _should_stream(args, overrides):
            if args.calib_checkpoint:
                raise OptionError("--calib-checkpoint is for the in-memory compile: a "
                                  "streamed compile calibrates block by block (use "
                                  "--no-stream, or drop --calib-checkpoint)")
            return _run_stream(args, overrides)
        tr = MemTrace(args.trace_memory)   # in memory: two steps, the compile and the save
        tr.mark("start")
        ck = (args.calib_checkpoint, "qdsl compile") if args.calib_checkpoint \
            else None
        qm = compile(args.model, args.recipe, calib=args.calib, settings=overrides,
                     max_cache_len=args.max_cache_len, fallback=args.fallback,
                     calib_checkpoint=ck)
        tr.mark("compile")
        for w in qm.plan.warnings:
            print(w.format(), file=sys.stderr)
        for f in qm.fallbacks:
            print(f"simulated (no integer kernel): {f['node']}: {f['reason']}",
                  file=sys.stderr)
        out = qm.save(args.out, force=args.force)
        tr.mark("save")
        tr.close()
        if tr.enabled:
            print(tr.summary(), file=sys.stderr)
    print(f"wrote {out} ({artifact_size(out) / 2**20:.2f} MB, lower={qm.lower}, "
          f"{len(qm.plan.quantized())} of {len(qm.plan.entries)} nodes quantized"
          + (f", {len(qm.fallbacks)} simulated" if qm.fallbacks else "") + ")")
    return 0


def _should_stream(args, overrides: Settings) -> bool:
    """``--stream`` / ``--no-stream``, or the automatic choice (compiler.autostream),
    said in one line on stderr when it streams or warns."""
    if args.stream is not None:
        return args.stream
    from ...compiler.build import as_recipe

    r = as_recipe(args.recipe)
    st = r.settings.then(overrides)
    d = autostream.decide(None, autostream.checkpoint_float_bytes(resolve_model(args.model).path),
                          autostream.memory_available(),
                          autostream.stream_refusal(r, st, st.lower or "fake"))
    if d.message:
        print(d.message, file=sys.stderr)
    return d.stream


def _run_stream(args, overrides) -> int:
    """``--stream``: the artifact is written by the streaming compile itself."""
    from ...artifact.store import artifact_size
    from ...compiler.stream import compile_stream

    qm = compile_stream(args.model, args.recipe, args.out, calib=args.calib,
                        settings=overrides, max_cache_len=args.max_cache_len,
                        force=args.force, trace_memory=args.trace_memory)
    for w in qm.plan.warnings:
        print(w.format(), file=sys.stderr)
    if args.trace_memory:
        print(summary(args.trace_memory), file=sys.stderr)
    print(f"wrote {args.out} ({artifact_size(args.out) / 2**20:.2f} MB, lower={qm.lower}, "
          f"{len(qm.plan.quantized())} of {len(qm.plan.entries)} nodes quantized, streamed)")
    return 0
