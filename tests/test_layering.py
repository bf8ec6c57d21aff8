"""The architecture as the imports draw it: allowed arrows between packages, no cycles, every
module importable on its own.

Imports are read from the source with `ast`, at module level and inside functions alike
(a function-level import is a dependency too, only a later one). `from a.b import c` is an
arrow to the module a.b.c when that is a module, else to a.b.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("pivotmerge", "service_core", "app", "workers")

# Top-level package -> the top-level packages it may import (besides itself).
ALLOWED_PACKAGES = {
    "pivotmerge": set(),
    "service_core": {"pivotmerge"},
    "workers": {"service_core", "pivotmerge"},
    "app": {"service_core", "pivotmerge", "workers"},
}
# app reaches workers only to enqueue jobs (the Celery app and its task names) and to read the job kinds'
# declarations (workers.kinds and its kind modules), never the task code.
APP_MAY_IMPORT_FROM_WORKERS = {"workers.celery_app", "workers.kinds"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_files() -> dict[str, Path]:
    return {module_name(p): p for pkg in PROJECT for p in sorted((ROOT / pkg).rglob("*.py"))}


MODULES = project_files()


def imported(name: str, path: Path) -> set[str]:
    """The project modules `name` imports, anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t.split(".")[0] in PROJECT}
    return found


GRAPH = {name: imported(name, path) for name, path in MODULES.items()}


def test_every_import_names_a_project_module_that_exists() -> None:
    missing = {(m, t) for m, targets in GRAPH.items() for t in targets if t not in MODULES}
    assert not missing


def test_packages_import_only_along_the_allowed_arrows() -> None:
    wrong = []
    for module, targets in GRAPH.items():
        top = module.split(".")[0]
        for target in targets:
            to = target.split(".")[0]
            if to != top and to not in ALLOWED_PACKAGES[top]:
                wrong.append(f"{module} -> {target}")
            elif top == "app" and to == "workers" and not any(
                    target == allowed or target.startswith(f"{allowed}.") for allowed in APP_MAY_IMPORT_FROM_WORKERS):
                wrong.append(f"{module} -> {target} (app only enqueues: {sorted(APP_MAY_IMPORT_FROM_WORKERS)})")
    assert not wrong


def may_import(docstring: str) -> set[str] | None:
    """The names after "May import:" in a package docstring; None for "everything in pivotmerge"."""
    match = re.search(r"May import: (.*?)\.(?:\s|$)", docstring, re.S)
    assert match, "the docstring says what the package may import: 'May import: a, b, c.'"
    text = re.sub(r"\([^)]*\)", "", match.group(1))
    if text.strip().startswith("everything in pivotmerge"):
        return None
    return {n.strip() for n in text.split(",") if n.strip() and n.strip() != "nothing"}


SUBPACKAGES = sorted(p.parent.name for p in (ROOT / "pivotmerge").glob("*/__init__.py"))
ROOT_MODULES = sorted(p.stem for p in (ROOT / "pivotmerge").glob("*.py") if p.stem != "__init__")


def unit(module: str) -> str:
    """The part of pivotmerge a module belongs to: its subpackage, or itself for a top-level module."""
    return module.split(".")[1] if module.count(".") else "pivotmerge"


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_each_pivotmerge_package_imports_what_its_docstring_allows(package: str) -> None:
    init = ROOT / "pivotmerge" / package / "__init__.py"
    allowed = may_import(ast.get_docstring(ast.parse(init.read_text())) or "")
    known = set(SUBPACKAGES) | set(ROOT_MODULES)
    assert allowed is None or allowed <= known, f"unknown names in the docstring: {allowed - known}"
    used = {unit(t) for m, targets in GRAPH.items() if m.startswith(f"pivotmerge.{package}") for t in targets
            if t.startswith("pivotmerge")} - {package}
    if allowed is None:
        assert "pivotmerge" not in used, "only the facade (pivotmerge/__init__) imports the facade"
        return
    assert used <= allowed, f"pivotmerge.{package} imports {sorted(used - allowed)}, which its docstring does not allow"
    assert allowed <= used, f"pivotmerge.{package}'s docstring allows {sorted(allowed - used)}, which it does not use"


def test_top_level_pivotmerge_modules_import_nothing_of_the_engine() -> None:
    # errors, progress, version: the leaves every package may use.
    assert {m: GRAPH[f"pivotmerge.{m}"] for m in ROOT_MODULES if GRAPH[f"pivotmerge.{m}"]} == {}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycles_finds_a_cycle_and_only_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_the_project_modules() -> None:
    assert cycles(GRAPH) == []


# Run in a subprocess: third-party packages are imported once, then each project module is
# imported in a child forked from that state, which has never imported any project module.
ISOLATED_IMPORTS = r"""
import importlib, os, sys
modules, preload = sys.argv[1].split(","), sys.argv[2].split(",")
for entry in preload:
    name, _, attr = entry.partition(":")
    try:
        module = importlib.import_module(name)
        if attr:
            getattr(module, attr, None)  # loads what a lazy package (transformers) imports on first access
    except Exception:
        pass  # an optional dependency; the project import that needs it reports the failure
assert not any(m.split(".")[0] in ("pivotmerge", "service_core", "app", "workers") for m in sys.modules)
failed, running = [], {}

def reap():
    pid, status = os.wait()
    if status:
        failed.append(running[pid])
    del running[pid]

for name in modules:
    while len(running) >= 2:
        reap()
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
            code = 0
        except BaseException as exc:
            print(f"{name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    running[pid] = name
while running:
    reap()
print(",".join(sorted(failed)))
"""


def third_party(graph_files: dict[str, Path]) -> list[str]:
    """The third-party modules and names the project imports at module level, as `module` or `module:name`,
    to import once before forking (each child would otherwise import them again: 90 s of CPU)."""
    entries = set()
    for path in graph_files.values():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                entries |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                entries |= {f"{node.module}:{a.name}" for a in node.names}
    return sorted(e for e in entries if e.split(".")[0].split(":")[0] not in PROJECT
                  and e.split(".")[0].split(":")[0] not in sys.stdlib_module_names)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks a child per module")
def test_each_module_imports_on_its_own_in_a_fresh_interpreter() -> None:
    done = subprocess.run([sys.executable, "-c", ISOLATED_IMPORTS, ",".join(MODULES), ",".join(third_party(MODULES))],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "", f"failed alone: {done.stdout.strip()}\n{done.stderr[-3000:]}"
