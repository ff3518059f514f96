"""The shape of the code: no import cycle, patches/ stays the hub, analysis/ flows one way through its folders,
no module over the agreed size, no private name used across modules."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"analysis": "recallfix.analysis", "patches": "recallfix.patches", "server": "recallfix.server"}
MAX_LINES = 450  # per module of analysis/ and patches/ (agreed in an earlier issue)
# analysis/'s folders in the order a run flows: a folder imports only from folders before it (and the
# package's own top-level modules: config, schema, records, calibration, progress, which import no folder).
FLOW = ("data", "mechanism", "learn", "evaluate", "report", "compare", "demo_model")
ENTRY_POINTS = ("pipeline", "cli", "rundiff")  # top-level modules that may import any folder


def module_names() -> dict[str, Path]:
    """Every module of the three packages, subpackages included: dotted name -> file."""
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            out[".".join([package, *parts]).removesuffix(".__init__")] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The recallfix modules `name` imports anywhere: at the top, inside functions (they import when called)
    and for type checking only (a cycle of annotations is a cycle of the design all the same)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import calibration`
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


def private_imports(path: Path) -> list[str]:
    """`from recallfix... import _name` and `from .x import _name`: a private name used outside its module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("recallfix")):
            found += [f"{path.name}:{node.lineno}: {alias.name}" for alias in node.names
                      if alias.name.startswith("_") and not alias.name.startswith("__")]
    return found


def test_the_graph_finder_sees_every_import_and_cycles(tmp_path: Path) -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\n"
                      "import recallfix.p.a\nfrom .b import x\nfrom . import c\nfrom .. import q\n"
                      "if TYPE_CHECKING:\n    from .d import y\n"
                      "def f():\n    from .e import z\n")
    known = {f"recallfix.p.{m}" for m in "abcde"} | {"recallfix.q"}
    assert imports_of("recallfix.p.m", source, known) == known


def test_module_names_reach_into_subpackages() -> None:
    names = module_names()
    assert "recallfix.analysis.learn.fit" in names and "recallfix.patches.registry.models" in names
    assert "recallfix.analysis.data" in names  # a subpackage's __init__


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_patches_never_imports_analysis_or_server() -> None:
    for name, imported in import_graph().items():
        if name.startswith("recallfix.patches"):
            assert not [m for m in imported if m.startswith(("recallfix.analysis", "recallfix.server"))], name


def folder_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if parts[:2] == ["recallfix", "analysis"] and len(parts) > 3 else None


def test_analysis_folders_import_only_earlier_folders() -> None:
    assert {p.name for p in (ROOT / "analysis").iterdir() if (p / "__init__.py").exists()} == set(FLOW)
    for name, imported in import_graph().items():
        if not name.startswith("recallfix.analysis."):
            continue
        here = folder_of(name)
        folders = {folder_of(m) for m in imported} - {None, here}
        if here is None and name.rsplit(".", 1)[1] not in ENTRY_POINTS:
            assert not folders, f"{name} is shared by every folder, yet imports from {sorted(folders)}"
        elif here is not None:
            later = [f for f in folders if FLOW.index(f) > FLOW.index(here)]
            assert not later, f"{name} (folder {here}) imports from {later}, later in the flow {FLOW}"
            entry = [m for m in imported if m.rsplit(".", 1)[1] in ENTRY_POINTS and folder_of(m) is None]
            assert not entry, f"{name} imports {entry}, which import every folder"


def test_no_module_over_the_size_limit() -> None:
    long = {str(path.relative_to(ROOT)): n for folder in ("analysis", "patches")
            for path in (ROOT / folder).rglob("*.py")
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}, f"modules over {MAX_LINES} lines"


def test_no_private_name_imported_across_modules() -> None:
    found = [hit for folder in ("analysis", "patches", "server", "tests", "bench", "demo", "evals")
             for path in sorted((ROOT / folder).rglob("*.py")) for hit in private_imports(path)]
    assert found == []


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
    names = sorted(n for n in module_names() if not n.startswith("recallfix.server"))  # server: vLLM's start-up
    done = subprocess.run([sys.executable, "-c", FIRST_IMPORT, *names], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {}
