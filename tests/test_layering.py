"""The package layering of docs/ARCHITECTURE.md, checked on the source: every module under
osteoscreen/ is parsed with `ast` and every import statement counted, function-local ones included
(they run too, only later), so that a layer cannot be crossed by hiding the import in a function."""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import osteoscreen

PACKAGE_DIR = Path(osteoscreen.__file__).resolve().parent
PURE = ("osteoscreen.pipeline", "osteoscreen.model", "osteoscreen.reports")
NOT_FROM_PURE = ("osteoscreen.synth", "osteoscreen.node", "osteoscreen.store", "osteoscreen.dispatch")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=None)
def modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _ours(name: str) -> str | None:
    """The osteoscreen module that `name` (a module, or a name inside one) is, or lies in."""
    known = modules()
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


@lru_cache(maxsize=None)
def graph() -> dict[str, frozenset[str]]:
    """Module -> the osteoscreen modules it imports anywhere in its body (top level, functions,
    classes, try/if blocks). `from pkg import sub` counts as importing `pkg.sub` when that is a
    module, else `pkg`; the parent packages an import loads implicitly are not counted."""
    out = {}
    for name, path in modules().items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets.update(filter(None, (_ours(alias.name) for alias in node.names)))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    target = sub if sub in modules() else _ours(source)
                    if target:
                        targets.add(target)
        targets.discard(name)
        out[name] = frozenset(targets)
    return out


def two_cycles() -> list[tuple[str, str]]:
    g = graph()
    found = sorted((a, b) for a in g for b in g[a] if a < b and a in g.get(b, ()))
    return found


def _within(name: str, packages) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_the_graph_sees_every_kind_of_import():
    g = graph()
    assert len(modules()) > 50
    assert "osteoscreen.pipeline.localize" in g["osteoscreen.pipeline.screen"]  # from .localize import x
    assert "osteoscreen.findings" in g["osteoscreen.pipeline.localize"]  # from ..findings import x
    assert "osteoscreen.pipeline.localize_net" in g["osteoscreen.pipeline.localize"]  # from . import module
    assert "osteoscreen.pipeline.localize" in g["osteoscreen.training.localiser"]  # inside a function


def test_pure_packages_import_no_node_store_dispatch_or_synth():
    """pipeline/, model/ and reports/ are what `osteoscreen predict` runs without a node: they import
    none of synth/ (the phantom generator: the localiser's atlas is a shipped file), node/, store/ or
    dispatch/, not even inside a function."""
    crossings = sorted((name, target) for name, targets in graph().items() if _within(name, PURE)
                       for target in targets if _within(target, NOT_FROM_PURE))
    assert not crossings, "\n".join(f"{a} imports {b}" for a, b in crossings)


def test_no_two_modules_import_each_other():
    """Function-local imports included: the flow runs one way."""
    cycles = two_cycles()
    assert not cycles, "modules that import each other:\n" + "\n".join(f"{a} <-> {b}" for a, b in cycles)
