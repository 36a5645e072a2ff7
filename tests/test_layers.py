"""The architecture, checked: no import circles between klrl's modules, and no module imports one from a layer
above its own. Every import counts, including those inside functions (that is how circles hide)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
# Low to high. A module may import from its own layer or below.
LAYERS = [
    ("klrl.errors", "klrl.paths", "klrl.hub", "klrl.plotstyle", "klrl.hydra_private"),  # leaves shared by everything
    ("klrl.core",),  # the pure math: estimators, the sampled distribution, losses, the enumerable toy
    ("klrl.config",),  # structured configs, declared constraints, the validator, config -> loss specs
    ("klrl.models", "klrl.tasks", "klrl.sampling"),  # what is trained, on what, and how responses are drawn
    ("klrl.audit",),  # exact and Monte-Carlo gradient audits
    ("klrl.runs",),  # the run directory, status, sweeps, tables
    ("klrl.training",),  # the trainer core and its batch sources
    ("klrl.cli", "klrl.testing", "klrl.__main__", "hydra_plugins"),  # commands and plugins
]


def layer(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} belongs to no layer; add it to LAYERS")


def modules() -> dict[str, Path]:
    out = {}
    for base in ("klrl", "hydra_plugins"):
        for path in (ROOT / base).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The klrl modules `path` imports (resolving `from pkg import module`)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if m in known and m != name}


def graph() -> nx.DiGraph:
    mods = modules()
    g = nx.DiGraph()
    for name, path in mods.items():
        g.add_node(name)
        for target in imports(path, name, set(mods)):
            if not name.startswith(target + ".") and target not in ("klrl", "hydra_plugins"):  # a package's own __init__
                g.add_edge(name, target)
    return g


def test_no_import_circles():
    cycles = list(nx.simple_cycles(graph()))
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c + c[:1]) for c in cycles[:10])


def test_no_import_from_a_lower_layer_to_a_higher_one():
    upward = [(a, b) for a, b in graph().edges if layer(b) > layer(a)]
    assert not upward, "\n".join(f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})" for a, b in upward)
