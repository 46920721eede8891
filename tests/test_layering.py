"""The package's layering, read statically from the source (`ast`, nothing imported): the core imports no task,
no two modules import each other through a cycle, and each package imports only the layers docs/DESIGN.md
allows it. A task is found by the registry through a string (`importlib`), which is no import here."""

from __future__ import annotations

import ast
import os
import re
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "diffusion_gemma"
TASKS = f"{PACKAGE}.tasks"

# Package (or module) -> the packages of this library it must not import (docs/DESIGN.md, "What each package
# may import").
FORBIDDEN = {
    f"{PACKAGE}.model": ("objective", "sampling", "training", "data", "checkpoints", "tasks", "aot"),
    f"{PACKAGE}.objective": ("training", "checkpoints", "data", "aot"),
    f"{PACKAGE}.sampling": ("training", "checkpoints", "data", "aot"),
    f"{PACKAGE}.data": ("aot",),
    f"{PACKAGE}.checkpoints": ("aot",),
    f"{PACKAGE}.training": ("aot",),
}


def _module_name(path: str) -> str:
    relative = os.path.relpath(path, REPO)[:-len(".py")].split(os.sep)
    return ".".join(relative[:-1] if relative[-1] == "__init__" else relative)


def _sources() -> dict[str, str]:
    """Module name -> path of every .py file of the package."""
    found = {}
    for directory, _, files in os.walk(os.path.join(REPO, PACKAGE)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                found[_module_name(path)] = path
    return found


SOURCES = _sources()


def _is_package(module: str) -> bool:
    return SOURCES.get(module, "").endswith("__init__.py")


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` names (relative imports resolved against `module`)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _known(name: str) -> str | None:
    """`name` as a module of this package: itself if it is one, else its longest prefix that is one."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in SOURCES:
            return ".".join(parts[:end])
    return None


def _imports(module: str, *, top_level_only: bool) -> list[tuple[str, int]]:
    with open(SOURCES[module]) as f:
        return _imports_in(f.read(), module, top_level_only=top_level_only)


def _imports_in(source: str, module: str, *, top_level_only: bool) -> list[tuple[str, int]]:
    """(imported module of this package, line) for every import statement of `module`'s source; with
    `top_level_only`, only those that run when the module is imported (the module body and class bodies,
    `if`/`try` blocks included; not function bodies, not `if TYPE_CHECKING:` blocks)."""
    found = []

    def visit(node, at_top: bool):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or (
                isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)):
            at_top = False
        if at_top or not top_level_only:
            if isinstance(node, ast.Import):
                found.extend((_known(alias.name), node.lineno) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, node)
                # `from pkg import name` imports the submodule pkg.name when there is one, else pkg itself.
                found.extend((_known(f"{base}.{alias.name}") if f"{base}.{alias.name}" in SOURCES else _known(base),
                              node.lineno) for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child, at_top)

    visit(ast.parse(source), True)
    found = [(target, line) for target, line in found if target is not None]
    # Importing a.b.c runs a/__init__ and a/b/__init__ first; the importer's own packages are already running.
    implied = [(parent, line) for target, line in found for parent in sorted(_ancestors(target))
               if parent in SOURCES and parent not in _ancestors(module)]
    return sorted({(target, line) for target, line in found + implied if target != module}, key=lambda x: x[1])


def _ancestors(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:end]) for end in range(1, len(parts))}


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _where(module: str, line: int) -> str:
    return f"{os.path.relpath(SOURCES[module], REPO)}:{line}"


def test_the_walk_finds_every_kind_of_import():
    """The checks below are only as good as the walk: relative and absolute imports, submodules named in a
    `from` import, the packages an import runs implicitly, and imports inside functions (which only the
    package rules count, since they cannot close a cycle at import time)."""
    assert f"{PACKAGE}.config" in SOURCES and f"{PACKAGE}.model.transformer" in SOURCES
    source = textwrap.dedent("""\
        import jax
        from typing import TYPE_CHECKING
        from . import attention
        from ..config import ModelConfig
        from diffusion_gemma.objective import sft
        if TYPE_CHECKING:
            from diffusion_gemma.data import pipeline
        class Layer:
            from diffusion_gemma import sharding
            def build(self):
                import diffusion_gemma.training.trainer
        """)
    module = f"{PACKAGE}.model.moe"
    top = {target for target, _ in _imports_in(source, module, top_level_only=True)}
    assert top == {f"{PACKAGE}.{name}" for name in ("model.attention", "config", "objective", "objective.sft",
                                                    "sharding")}
    every = {target for target, _ in _imports_in(source, module, top_level_only=False)}
    assert every == top | {f"{PACKAGE}.{name}" for name in ("data", "data.pipeline", "training", "training.trainer")}
    assert _cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"], "e": []}) == [["a", "b", "c"]]


def test_no_module_outside_the_tasks_imports_a_task():
    offenders = [f"{_where(module, line)} imports {target}"
                 for module in sorted(SOURCES) if not _within(module, TASKS)
                 for target, line in _imports(module, top_level_only=False) if _within(target, TASKS)]
    assert not offenders, "\n".join(offenders)


def test_no_import_cycles():
    edges = {module: _imports(module, top_level_only=True) for module in SOURCES}
    cycles = _cycles({module: sorted({target for target, _ in found}) for module, found in edges.items()})
    report = []
    for members in cycles:
        report.append("import cycle among " + ", ".join(members) + ":")
        report.extend(f"  {_where(module, line)} imports {target}" for module in members
                      for target, line in edges[module] if target in members)
    assert not cycles, "\n".join(report)


def _cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan): the modules of each cycle."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    counter = [0]

    def strongconnect(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for successor in graph.get(node, ()):
            if successor not in index:
                strongconnect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            strongconnect(node)
    return components


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_what_the_design_allows(package):
    banned = tuple(f"{PACKAGE}.{name}" for name in FORBIDDEN[package])
    offenders = [f"{_where(module, line)} imports {target}"
                 for module in sorted(SOURCES) if _within(module, package)
                 for target, line in _imports(module, top_level_only=False)
                 if any(_within(target, name) for name in banned)]
    assert not offenders, "\n".join(offenders)


def test_the_registry_imports_nothing_from_the_library():
    module = f"{PACKAGE}.registry"
    offenders = [f"{_where(module, line)} imports {target}" for target, line in _imports(module, top_level_only=False)]
    assert not offenders, "\n".join(offenders)


def test_no_task_is_named_outside_the_tasks():
    offenders = []
    for module, path in sorted(SOURCES.items()):
        if _within(module, TASKS):
            continue
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if re.search("sudoku", line, re.IGNORECASE):
                    offenders.append(f"{os.path.relpath(path, REPO)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
