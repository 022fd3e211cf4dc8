"""The layers of qdsl, enforced on its import graph (docs/architecture.md).

Every import in ``qdsl/`` (module level and inside functions; relative ones resolved)
is an edge of a networkx graph of modules. A module's layer is its subpackage
(``qdsl.passes.freeze`` -> ``passes``) or, at the top level, its own name. The test
fails on an import cycle and on an import that goes up or sideways (a layer imports
only layers of a lower rank), and on ``torch`` in the torch-free layers. Today's
violations are listed in KNOWN; the test also fails when one of them is gone, so the
list only shrinks: delete the entry in the commit that fixes it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "qdsl"

# A layer imports only layers of a lower rank (never one of its own rank, never a
# higher one). Within a layer, modules import each other freely (no cycles).
RANK = {
    "qdsl": 0, "errors": 0, "resources": 0,   # __version__, the error types, data dirs
    "atomic": 1,     # atomic writes and the output-directory rules (errors, __version__)
    "config": 1,     # Recipe, TensorSpec: frozen dataclasses, torch-free
    "lang": 2,       # text -> Recipe, torch-free; reads config (what a recipe means)
    "graph": 3,      # capture, roles, naming, select, attrs
    "quant": 3,      # quantizer maths and observers
    "models": 3,     # zoo, loaders, CausalLM, limits, calibration data, stdlib corpus
    "plan": 4,       # Recipe x NamedGraph -> QuantPlan
    "runtime": 4,    # modules that run in a lowered graph
    "passes": 5,     # graph rewrites
    "artifact": 6,   # the artifact on disk (read / write)
    "compiler": 7,   # the driver: explain, compile, load
    "eval": 8,       # completion, perplexity, HumanEval, robustness, hosting metrics
    "study": 9,      # the seed-paper reproduction: a client of the library
    "cli": 10,       # argument parsing, one library call per command
}
# Edges the ranks allow that are still wrong.
FORBIDDEN = {
    ("runtime", "graph"): "a runtime module runs without the graph analysis",
}
TORCH_FREE = {"config", "lang"}
HEAVY = ("torch", "transformers", "safetensors")

# Today's violations: (kind, detail). Each must still occur; fix one, delete its line.
KNOWN: set[tuple[str, str]] = set()


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "qdsl"


def modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return out


def import_graph() -> tuple[nx.DiGraph, dict[str, set[str]]]:
    """(qdsl module -> qdsl module edges, module -> external top-level packages)."""
    mods = modules()
    g, external = nx.DiGraph(), {}
    for name, (path, is_pkg) in mods.items():
        g.add_node(name)
        pkg = name if is_pkg else name.rpartition(".")[0]
        targets = []
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # from ..x import y, seen from package pkg
                    base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module
                # `from pkg import submodule` is an edge to the submodule
                targets += [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod
                            for a in node.names]
        for t in targets:
            if t in mods:
                if t != name:
                    g.add_edge(name, t)
            elif t.split(".")[0] != "qdsl":
                external.setdefault(name, set()).add(t.split(".")[0])
            else:
                raise AssertionError(f"{name} imports {t}, which is not a module of qdsl")
    return g, external


def violations() -> set[tuple[str, str]]:
    g, external = import_graph()
    found = set()
    for cycle in nx.simple_cycles(g):
        start = cycle.index(min(cycle))  # one spelling per cycle
        cycle = cycle[start:] + cycle[:start]
        found.add(("cycle", " -> ".join(cycle + cycle[:1])))
    for a, b in g.edges:
        la, lb = layer(a), layer(b)
        if la == lb:
            continue
        if la not in RANK or lb not in RANK:
            found.add(("unranked", f"{a} -> {b}"))
        elif RANK[lb] >= RANK[la]:
            found.add(("upward", f"{a} -> {b}"))
        elif (la, lb) in FORBIDDEN:
            found.add(("forbidden", f"{a} -> {b}"))
    for name, pkgs in external.items():
        if layer(name) in TORCH_FREE:
            found |= {("heavy", f"{name} -> {p}") for p in pkgs if p in HEAVY}
    return found


def test_every_layer_is_ranked():
    layers = {layer(m) for m in modules()}
    assert layers <= set(RANK), f"add to RANK (and docs/architecture.md): {layers - set(RANK)}"


def test_no_new_violations():
    new = violations() - KNOWN
    assert not new, "layering violations (docs/architecture.md):\n" + "\n".join(
        f"  {kind}: {detail}" for kind, detail in sorted(new))


def test_known_violations_still_occur():
    gone = KNOWN - violations()
    assert not gone, "fixed, delete from KNOWN:\n" + "\n".join(
        f"  {kind}: {detail}" for kind, detail in sorted(gone))


@pytest.mark.parametrize("name", ["qdsl.lang", "qdsl.config.recipe", "qdsl.config.spec"])
def test_torch_free_layers_import_without_torch(name):
    import subprocess
    import sys

    code = f"import sys, {name}; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_the_graph_sees_imports_inside_functions():
    g, _ = import_graph()
    # compiler.build imports the passes inside compile(), lazily
    assert g.has_edge("qdsl.compiler.build", "qdsl.passes.pipeline")
    assert g.has_edge("qdsl.cli.commands.check", "qdsl.lang")
