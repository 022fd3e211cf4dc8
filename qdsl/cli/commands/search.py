"""qdsl search --model M (--budget BPW | --size MB | --decode-ms MS) --candidates C -o OUT."""

from __future__ import annotations

import sys

from ..args import (nonneg_int, output_file, positive_float, positive_int, seed_int)
from ..names import COMMANDS


def register(sub) -> None:
    p = sub.add_parser(
        "search", help=COMMANDS["search"],
        description="Score every candidate spec on every searched unit of MODEL (the linears "
                    "reading one tensor: their weights and that input; with --activations "
                    "all also residual sums, softmax, scores, ...) with a Fisher score from one "
                    "backward per batch of calibration windows, check the score against the "
                    "directly measured loss change of a sample, choose the least-loss "
                    "allocation under the budget exactly (integer linear program), compile it "
                    "and measure its loss on held-out windows, and write it as a readable "
                    "recipe whose header states the budget, the predicted and measured loss "
                    "and the command. Progress is saved beside the output (OUT.partial.json "
                    "and .safetensors) after every scored batch and checked pair: an "
                    "interrupted search re-run with the same arguments resumes. "
                    "docs/search.md.")
    p.add_argument("--model", required=True, help="short name, checkpoint directory or hub id")
    b = p.add_mutually_exclusive_group(required=True)
    b.add_argument("--budget", type=positive_float, metavar="BITS",
                   help="bits per searched weight, scales and zero points included")
    b.add_argument("--size", type=positive_float, metavar="MB",
                   help="the model's parameter storage in MB (10^6 bytes), counted as `qdsl "
                        "explain` counts it (float tensors at fp32; explain prints MiB)")
    b.add_argument("--decode-ms", type=positive_float, metavar="MS",
                   help="decode time per token under a bandwidth bound: bytes read per token "
                        "/ this machine's measured read bandwidth")
    p.add_argument("--candidates", required=True, metavar="SPECS",
                   help="recipe specs separated by `;` (or `,` before a spec starting with a "
                        "width, preset or skip): \"w8a8; w4a16 group(128); skip\"")
    p.add_argument("--transforms", default="none", metavar="OPTIONS",
                   help="transform prefixes to choose among, separated by `;`: `none` (the "
                        "model as it is) or statements as a recipe writes them (`rotate`). "
                        "Each is searched on its own transformed graph (the cost times the "
                        "number of options) and the one whose found recipe has the lowest "
                        "measured loss (predicted with --no-measure) is written, its "
                        "statements first: \"none; rotate\" (default: none)")
    p.add_argument("-o", "--output", required=True, type=output_file(".qrec"),
                   help="the found recipe (.qrec), written when the search ends; until then "
                        "OUT.partial.json (+ .safetensors) keeps the progress")
    p.add_argument("--act-bits", type=positive_float, metavar="BITS",
                   help="also bound the mean activation width over searched activations "
                        "(float counts 16)")
    p.add_argument("--activations", choices=["inputs", "all"], default="inputs",
                   help="inputs: linear inputs only (default); all: every activation")
    p.add_argument("--calib", default="stdlib", metavar="DATA",
                   help="calibration data: a directory of code, a saved dataset, or 'stdlib' "
                        "(default)")
    p.add_argument("--samples", type=positive_int, default=32, help="calibration windows (32)")
    p.add_argument("--seq-len", type=positive_int, default=256, help="tokens per window (256)")
    p.add_argument("--batch", type=positive_int, default=4, help="windows per backward (4)")
    p.add_argument("--check", type=nonneg_int, default=12, metavar="N",
                   help="(unit, candidate) pairs whose loss change is measured directly (12)")
    p.add_argument("--check-windows", type=positive_int, default=8, metavar="N",
                   help="windows for the direct check (8)")
    p.add_argument("--seed", type=seed_int, default=0, help="window sampling seed (0)")
    p.add_argument("--report", type=output_file(".json"), metavar="FILE",
                   help="also write every score, the check, the measured loss and the "
                        "timings as JSON")
    p.add_argument("--measure-windows", type=positive_int, default=16, metavar="N",
                   help="held-out windows the found recipe's loss is measured on: the first "
                        "N samples of --measure-bench, as `qdsl eval --n N --ppl-windows N "
                        "--seed SEED` scores them (16)")
    p.add_argument("--measure-bench", default="stdlib", metavar="BENCH",
                   help="the benchmark of the measured windows, as `qdsl eval --bench` "
                        "(default: stdlib, its held-out test split)")
    p.add_argument("--no-measure", action="store_true",
                   help="do not compile and measure the found recipe (the header says so)")
    p.add_argument("--no-resume", action="store_true",
                   help="start afresh even if a saved state of the same arguments exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from ...search.run import SearchConfig, search

    kind, value = next((k, v) for k, v in (("budget", args.budget), ("size", args.size),
                                           ("decode_ms", args.decode_ms)) if v is not None)
    cfg = SearchConfig(model=args.model, candidates=args.candidates, kind=kind, value=value,
                       out=args.output, act_bits=args.act_bits, activations=args.activations,
                       calib=args.calib, samples=args.samples, seq_len=args.seq_len,
                       batch=args.batch, check=args.check, check_windows=args.check_windows,
                       seed=args.seed, report=args.report, measure=not args.no_measure,
                       measure_bench=args.measure_bench, measure_windows=args.measure_windows,
                       resume=not args.no_resume, transforms=args.transforms, notify=lambda m: print(m, file=sys.stderr),
                       progress=True, command=["qdsl", *sys.argv[1:]])
    r = search(cfg)
    a = r.allocation
    print(f"wrote {args.output}: {a.bytes / 1e6:.3f} MB, "
          f"{r.space.bits_per_weight(a.picks):.3f} bits per searched weight, predicted loss "
          f"+{a.score:.4f} nats/token" + (
              "" if r.measured is None else
              f", measured {r.measured.loss:.4f} nats/token (float {r.measured.float_loss:.4f})"
              f" on {r.measured.windows} windows") +
          (f", transforms `{r.transform}`" if len(r.options) > 1 or r.transform != "none"
           else "") + f", search {r.seconds['total'] / 60:.1f} min", file=sys.stderr)
    return 0
