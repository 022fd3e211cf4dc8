"""``qdsl compare A [B]``: two rows of ``qdsl eval --json`` files, paired, with 95%
intervals and verdicts against the study's margins (``qdsl.study.compare``)."""

from __future__ import annotations

import argparse

from ...atomic import write_json_atomic
from ...study.compare import CompareError, compare, load_row, parse_spec, render, shared
from ..args import output_file, positive_float
from ..names import COMMANDS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare", help=COMMANDS["compare"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Compare two evaluated rows, paired on the samples both scored: ES, EM and\n"
            "pass@1 as differences A - B (points), perplexity as the ratio A / B, each with\n"
            "its 95% interval (ES: t on the paired differences, a percentile bootstrap\n"
            "beside it; EM and pass@1: McNemar's exact test with Newcombe's interval;\n"
            "perplexity: t on the paired per-window log-losses). For each: whether the rows\n"
            "differ, and whether A loses at most a margin against B (within / beyond /\n"
            "inconclusive, with the samples that would decide an inconclusive one at the\n"
            "same estimate). Rows that did not score the same samples are an error."),
        epilog=(
            "A row is FILE (its target), FILE:target or FILE:baseline, where FILE was\n"
            "written by `qdsl eval ... --json FILE`. With one argument, the file's target\n"
            "is compared with its own baseline (the float model scored in the same run).\n"
            "A sweep's cache entry (DIR/cache/KEY.json, one job) is a row too, also named\n"
            "DIR:RECIPE (a recipe path suffix, or fp32), which also carries the recipe's\n"
            "HumanEval job where the sweep ran one (pass@1); its float row is named as B.\n\n"
            "examples:\n"
            "  qdsl compare int8.json                 # the artifact vs fp32, same run\n"
            "  qdsl compare learned.json plain.json   # two artifacts, same --n/--seed\n"
            "  qdsl compare a.json b.json --margin-es 1 --json a_vs_b.json\n"
            "  qdsl compare DIR/cache/KEY1.json DIR/cache/KEY2.json   # two sweep rows\n"
            "  qdsl compare results/sweep:storti/t2_w8a32 results/sweep:fp32"))
    p.add_argument("a", metavar="A",
                   help="the row compared (FILE[:target|:baseline], DIR/cache/KEY.json or "
                        "DIR:RECIPE)")
    p.add_argument("b", metavar="B", nargs="?",
                   help="the row it is compared with (default: A's file's baseline)")
    p.add_argument("--margin-es", type=positive_float, metavar="POINTS",
                   help="ES points A may lose and still be 'within' (default: the study's, 2)")
    p.add_argument("--margin-em", type=positive_float, metavar="POINTS",
                   help="exact-match points (default 2)")
    p.add_argument("--margin-pass1", type=positive_float, metavar="POINTS",
                   help="HumanEval pass@1 points (default 5)")
    p.add_argument("--margin-ppl", type=positive_float, metavar="PCT",
                   help="perplexity ratio above 1, in percent (default 5: x1.05)")
    p.add_argument("--shared", action="store_true",
                   help="compare on the samples both rows scored (rows evaluated at different "
                        "--n with the same --seed: the smaller one's samples are the larger's "
                        "first); perplexity only where the windows are the same")
    p.add_argument("--json", metavar="FILE", type=output_file(".json"),
                   help="also write the comparison as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    given = {"es": args.margin_es, "em": args.margin_em, "pass1": args.margin_pass1,
             "ppl_pct": args.margin_ppl}
    a = load_row(args.a)
    if args.b is None:
        if parse_spec(args.a)[1] == "baseline":
            raise CompareError(f"{args.a}: a baseline row needs a row B to compare with")
        b = load_row(parse_spec(args.a)[0], default_side="baseline")
    else:
        b = load_row(args.b)
    if args.shared:
        had_windows = all(r.data.get("ppl_window_nll") for r in (a, b))
        a, b, n = shared(a, b)
        print(f"on the {n:,} completion samples both rows scored"
              + ("; perplexity not compared (the rows scored different windows)"
                 if had_windows and not a.data.get("ppl_window_nll") else ""))
    result = compare(a, b, {k: v for k, v in given.items() if v is not None})
    print(render(result))
    if args.json:
        write_json_atomic(args.json, result)
        print(f"wrote {args.json}")
    return 0
