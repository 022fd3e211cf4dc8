"""qdsl explain RECIPE --model MODEL: what the recipe selects, before any data."""

from __future__ import annotations

import json
import sys

from ...models.limits import check_block, model_blocks
from ..names import COMMANDS
from ..args import add_recipe_model, nonneg_int, output_file


def register(sub) -> None:
    p = sub.add_parser(
        "explain", help=COMMANDS["explain"],
        description="Capture MODEL as a graph, name its nodes, match RECIPE against them and "
                    "print, per node: canonical name, role, module path, weight spec, for a "
                    "linear its input (the activation it reads and the node making it), "
                    "activation spec and the rule (file:line:col) that decided it; then a "
                    "summary. "
                    "No data and no calibration are needed.")
    add_recipe_model(p, "short name (smollm2-135m, stdlib-gpt2, qwen2.5-coder-0.5b), "
                        "a local transformers checkpoint directory, or a hub id")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--lower", choices=["fake", "int8"], default=None,
                   help="also say how each node would run under this lowering "
                        "(real integer arithmetic or simulated); default: the recipe's setting")
    p.add_argument("--graph", metavar="FILE", type=output_file(".svg", ".png"),
                   help="draw one block to FILE (.svg or .png)")
    p.add_argument("--block", type=nonneg_int, default=0, metavar="N",
                   help="the block --graph draws, 0 to the model's blocks - 1 (default 0)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ...compiler.build import explain

    if args.graph:  # from the model's config.json, before loading or capturing it
        check_block("--block", args.block, model_blocks(args.model))
    result = explain(args.recipe, args.model, lower=args.lower)
    for w in result.plan.warnings:
        print(w.format(), file=sys.stderr)
    if args.format == "json":
        print(json.dumps(result.rows(), indent=1))
    else:
        print(result.table())
        print()
        print(result.summary())
        lines = result.kernel_lines()
        if lines:
            print()
            print("Kernels on this CPU (--lower int8):")
            print("\n".join(f"  {line}" for line in lines))
    if args.graph:
        result.draw(args.graph, block=args.block)
        print(f"wrote {args.graph}", file=sys.stderr)
    errors = result.export_errors   # `set export`: what the format cannot carry
    for d in errors:
        print(d.format(), file=sys.stderr)
    return 1 if errors else 0
