"""The house rules of the code map (README): no import circle, and no import from a lower layer to a higher one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"lowrank_surgery": ROOT / "lowrank_surgery", "lowrank_surgery.cli": ROOT / "cli",
            "lowrank_surgery.kernels": ROOT / "kernels"}
# The README's code map, bottom-up: a module may import its own layer and the layers before it.
LAYERS = [
    {"errors", "progress", "device", "config", "architecture", "data"},
    {"checkpoint", "svd", "targets", "formats", "formats.gguf", "cards"},
    {"subspace"},
    {"kernels", "methods"},
    {"adapter"},
    {"formats.common", "formats.kohya", "formats.mlx", "initialize", "attach", "merge", "convert", "extract",
     "inspect", "hub", "sharding", "train"},
    {"cli", ""},  # "": the package itself, which gathers the public API
]


def _modules() -> dict[str, Path]:
    found = {}
    for package, directory in PACKAGES.items():
        for file in directory.rglob("*.py"):
            parts = [p for p in file.relative_to(directory).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = file
    return found


def _imports(module: str, file: Path, known: set[str]) -> set[str]:
    """The package's modules `module` imports (lazy imports included, TYPE_CHECKING ones not)."""
    tree = ast.parse(file.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", "") == "TYPE_CHECKING" for n in ast.walk(node)}
    here = module.split(".") if file.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only or not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
            continue
        base = ".".join(here[: len(here) - node.level + 1] + [node.module or ""]).strip(".") if node.level \
            else node.module or ""
        subs = {f"{base}.{a.name}" for a in node.names} & known
        found |= subs if len(subs) == len(node.names) else subs | {base}
    return (found & known) - {module}


def _layer(module: str) -> int:
    """The layer of a module: its own name's, else its package's (methods.cola is in methods' layer)."""
    name = module.removeprefix("lowrank_surgery").removeprefix(".")
    names = [name] + [name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)]
    for candidate in names:
        for index, layer in enumerate(LAYERS):
            if candidate in layer:
                return index
    raise AssertionError(f"{module} has no layer in the code map: add it to LAYERS and to the README")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, f, set(modules)) for m, f in modules.items()}


def test_no_import_circle(graph):
    def circle_through(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in sorted(graph[node]):
                if nxt == start:
                    return trail + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, trail + [nxt]))
        return None

    circles = [c for m in sorted(graph) if (c := circle_through(m))]
    assert not circles, " -> ".join(circles[0])


def test_no_import_from_a_higher_layer(graph):
    upward = [(m, d) for m, deps in graph.items() for d in deps if _layer(d) > _layer(m)]
    assert not upward, upward
