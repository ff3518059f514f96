"""The modules of analysis/ and patches/ import without cycles, each on its own, and patches/ stays the hub."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"analysis": "recallfix.analysis", "patches": "recallfix.patches"}


def module_names() -> dict[str, Path]:
    return {f"{package}.{path.stem}".removesuffix(".__init__"): path
            for folder, package in PACKAGES.items() for path in sorted((ROOT / folder).glob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The recallfix modules `name` imports when it is imported (not inside functions, which import when
    called, nor for type checking only)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            return
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import calibration`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_finder_sees_imports_and_cycles(tmp_path: Path) -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\n"
                      "import recallfix.p.a\nfrom .b import x\nfrom . import c\nfrom .. import q\n"
                      "if TYPE_CHECKING:\n    from .d import y\n"
                      "def f():\n    from .e import z\n")
    known = {f"recallfix.p.{m}" for m in "abcde"} | {"recallfix.q"}
    assert imports_of("recallfix.p.m", source, known) == {"recallfix.p.a", "recallfix.p.b", "recallfix.p.c",
                                                           "recallfix.q"}


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_patches_never_imports_analysis() -> None:
    for name, imported in import_graph().items():
        if name.startswith("recallfix.patches"):
            assert not [m for m in imported if m.startswith("recallfix.analysis")], name


# Imports each module first, in a forked child of an interpreter that has loaded only the third-party
# libraries (loading torch once instead of once per module).
FIRST_IMPORT = """
import importlib, json, os, sys
for lib in ("torch", "transformers", "numpy", "pydantic", "safetensors", "tqdm"):
    importlib.import_module(lib)
failed = {}
for name in sys.argv[1:]:
    assert not [m for m in sys.modules if m.startswith("recallfix")]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(name)
        except BaseException as err:
            os.write(write, f"{type(err).__name__}: {err}".encode())
            os._exit(1)
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        message = f.read()
    if os.waitpid(pid, 0)[1]:
        failed[name] = message
print(json.dumps(failed))
"""


def test_every_module_imports_first() -> None:
    """Each module imported before any other of recallfix: a cycle broken only by import order fails here."""
    names = sorted(module_names())
    done = subprocess.run([sys.executable, "-c", FIRST_IMPORT, *names], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {}
