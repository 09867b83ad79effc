"""Dependencies point one way: core -> run layer / trainer / eval -> loops -> entry points.

Every module imports; module-level imports form no cycle between modules or between
packages; and no import (module-level or inside a function) reaches up a layer.
"""
from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import jaxttt

ROOT = Path(jaxttt.__file__).resolve().parent
CORE, INFRA, LOOPS, ENTRY = range(4)
LAYER_NAMES = ("core", "run layer/trainer/eval", "loops", "entry")
# module prefix -> layer; the longest matching prefix wins (see DESIGN.md, "Layout")
LAYERS = {
    "jaxttt": CORE, "jaxttt.errors": CORE, "jaxttt.glossary": CORE, "jaxttt.config": CORE,
    "jaxttt.sharding": CORE, "jaxttt.sampling": CORE, "jaxttt.model": CORE, "jaxttt.data": CORE,
    "jaxttt.runs": INFRA, "jaxttt.train.trainer": INFRA, "jaxttt.train.checkpoint": INFRA,
    "jaxttt.train.metrics": INFRA, "jaxttt.eval": INFRA,
    # model conversion reads and writes run directories (checkpoints), so it sits on the run layer
    "jaxttt.model.pretrained": INFRA, "jaxttt.model.export": INFRA,
    "jaxttt.train": LOOPS, "jaxttt.sdft": LOOPS, "jaxttt.discover": LOOPS, "jaxttt.ponder": LOOPS,
    "jaxttt.seal": LOOPS,
    "jaxttt.cli": ENTRY, "jaxttt.demo": ENTRY, "jaxttt.demo_real": ENTRY, "jaxttt.bench": ENTRY,
}


def modules() -> list[str]:
    return ["jaxttt"] + sorted(m.name for m in pkgutil.walk_packages([str(ROOT)], "jaxttt."))


def layer(mod: str) -> int:
    if mod.rsplit(".", 1)[-1].endswith("commands"):
        return ENTRY  # every `commands.py` / `*_commands.py` is argparse glue
    best = max((p for p in LAYERS if mod == p or mod.startswith(p + ".")), key=len)
    return LAYERS[best]


def source(mod: str) -> Path:
    rel = Path(*mod.split(".")[1:])
    pkg = ROOT / rel / "__init__.py"
    return pkg if pkg.is_file() else (ROOT / rel).with_suffix(".py")


def _target(name: str, known: set[str]) -> str | None:
    """The jaxttt module `name` refers to (a submodule, else its package)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(mod: str, known: set[str]) -> tuple[set[str], set[str]]:
    """(module-level imports, all imports) of `mod` that are jaxttt modules."""
    tree = ast.parse(source(mod).read_text(encoding="utf-8"))
    is_pkg = source(mod).name == "__init__.py"
    top_nodes = set()
    for node in tree.body:  # module level, including under if/try at module level
        top_nodes.update(id(n) for n in ast.walk(node)
                         if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))
    top, every = set(), set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for n in names:
            t = _target(n, known)
            if t is None or t == mod or not n.startswith("jaxttt"):
                continue
            if isinstance(node, ast.ImportFrom) and t == node.module and f"{t}." in n:
                pass  # `from pkg import name`: the package itself (or the submodule, added too)
            every.add(t)
            if id(node) in top_nodes:
                top.add(t)
    return top, every


@pytest.fixture(scope="module")
def graph():
    mods = modules()
    known = set(mods)
    return {m: imports(m, known) for m in mods}


def test_every_module_imports():
    failed = []
    for mod in modules():
        try:
            importlib.import_module(mod)
        except Exception as e:  # report them all at once
            failed.append(f"{mod}: {type(e).__name__}: {e}")
    assert not failed, "\n".join(failed)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _package(mod: str) -> str:
    return ".".join(mod.split(".")[:2])


def test_no_module_import_cycle(graph):
    edges = {m: {t for t in top if not (source(t).name == "__init__.py" and m.startswith(t + "."))}
             for m, (top, _) in graph.items()}  # a module importing its own package is fine
    assert _cycles(edges) == []


def test_no_package_import_cycle(graph):
    edges: dict[str, set[str]] = {}
    for m, (top, _) in graph.items():
        if layer(m) == ENTRY:
            continue  # entry points may import every package
        for t in top:
            if _package(t) != _package(m) and layer(t) != ENTRY:
                edges.setdefault(_package(m), set()).add(_package(t))
    assert _cycles(edges) == []


def test_imports_point_down_the_layers(graph):
    up = [f"{m} ({LAYER_NAMES[layer(m)]}) imports {t} ({LAYER_NAMES[layer(t)]})"
          for m, (_, every) in sorted(graph.items()) for t in sorted(every) if layer(t) > layer(m)]
    assert up == [], "\n".join(up)


def test_layer_table_is_not_vacuous(graph):
    """The checks above see real edges: e.g. the loops import the trainer core and the run layer."""
    assert layer("jaxttt.train.loop") == LOOPS and layer("jaxttt.eval.commands") == ENTRY
    assert "jaxttt.runs" in graph["jaxttt.train.loop"][0]
    assert "jaxttt.config" in graph["jaxttt.runs"][0]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
