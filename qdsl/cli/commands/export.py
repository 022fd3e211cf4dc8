"""``qdsl export``: an artifact as a GGUF file (llama.cpp) or a compressed-tensors
model directory (vLLM), from qdsl's own codes and scales."""

from __future__ import annotations

import argparse

from ...atomic import write_json_atomic
from ...errors import OptionError
from ..args import output_file
from ..names import COMMANDS

DESCRIPTION = """\
Write a compiled artifact (compiled with the default --lower fake) in a format
other runtimes serve, from qdsl's own integer codes and scales:

  qdsl export out/q --format gguf -o model.gguf
  qdsl export out/q --format compressed-tensors -o model-ct/

GGUF: symmetric weights of groups of 32 columns become Q8_0 (5-8 bits) or Q4_0
(2-4 bits), asymmetric 4-bit ones Q4_1, float ones F32 / F16 / BF16. GGUF scales
are fp16: compile with `set export = gguf` in the recipe (recipes/export/) so the
grid is carried exactly. Any weight that is not carried exactly is an error naming
its node and the nearest exportable spec; --requantize re-rounds such weights with
llama.cpp's reference quantizer and reports each one's error. docs/export.md."""


def register(sub) -> None:
    p = sub.add_parser("export", help=COMMANDS["export"], description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", metavar="ARTIFACT")
    p.add_argument("--format", required=True, choices=("gguf", "compressed-tensors"))
    p.add_argument("-o", "--out", required=True,
                   help="the .gguf file, or the compressed-tensors model directory")
    p.add_argument("--model", help="the source model (default: the one the artifact records)")
    p.add_argument("--requantize", action="store_true",
                   help="GGUF: re-round weights the format cannot carry exactly (listed with "
                        "their error) instead of refusing")
    p.add_argument("--no-vocab", action="store_true",
                   help="GGUF: weights and hyper-parameters only, no tokenizer (llama.cpp "
                        "will not load it; for inspection)")
    p.add_argument("--force", action="store_true",
                   help="compressed-tensors: replace an existing export directory")
    p.add_argument("--json", metavar="FILE", type=output_file(".json"),
                   help="write the export report (every tensor, its type, errors) as .json")
    p.add_argument("--no-verify", action="store_true",
                   help="read an artifact even if its files do not match their recorded sha256")
    p.set_defaults(func=run)


def run(args) -> int:
    from ...export import export

    if args.format == "gguf" and not args.out.endswith(".gguf"):
        raise OptionError(f"-o/--out: a GGUF file must end in .gguf, got {args.out!r}")
    rep = export(args.artifact, args.format, args.out, model=args.model,
                 requantize=args.requantize, vocab=not args.no_vocab,
                 verify=not args.no_verify, force=args.force)
    types = ", ".join(f"{n} {t}" for t, n in sorted(rep["types"].items()))
    print(f"wrote {rep['path']} ({rep['format']}, {rep['bytes'] / 2**20:.1f} MiB): "
          f"{len(rep['tensors'])} tensors: {types}")
    for r in rep.get("requantized", []):
        print(f"  re-rounded {r['tensor']} (node {r['node']}, {r['spec']} -> {r['type']}): "
              f"{r['reason']}; max |dw| {r['max_abs_error']:.3g}, "
              f"relative RMS {r['rel_rms_error']:.3g}")
    if args.json:
        write_json_atomic(args.json, rep)
        print(f"wrote {args.json}")
    return 0
