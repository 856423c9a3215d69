"""The package's import graph points one way: no module imports, directly or through others, a module that
imports it back. Function-level imports count too, and so does a string naming a module (one imported by name
when first needed), so a cycle cannot hide in either."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mergekit_lite"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (`from pkg import name` counts as pkg.name when that is a
    module, else as pkg, whose __init__ then runs for the name; a string that names a module counts as an
    import of it)."""
    modules = _modules()

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value and node.value in modules:
                targets = [node.value]
            for target in targets:
                found = owner(target) if target.startswith("mergekit_lite") else None
                if found is not None and found != name:
                    graph[name].add(found)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycles():
    graph = import_graph()
    assert "mergekit_lite.dispatch" in graph and graph["mergekit_lite.dispatch"]  # the walk sees real imports
    assert cycles(graph) == []


def test_modules_imported_by_name_count_in_the_graph():
    graph = import_graph()
    assert {"mergekit_lite.pleas.pipeline", "mergekit_lite.twin.pipeline"} <= graph["mergekit_lite.dispatch"]


_LOADED = ("print(sorted({m.split('.')[0] if m.startswith('scipy') else m for m in sys.modules "
           "if m.startswith(('scipy', 'mergekit_lite.pleas', 'mergekit_lite.twin'))}))")


def _loaded_after(*steps: str) -> list[str]:
    """In a fresh interpreter, the whole-model modules loaded after each statement in turn."""
    probe = "; ".join(["import sys, mergekit_lite.dispatch as dispatch, mergekit_lite.cli, mergekit_lite.api",
                       *(f"{step}; {_LOADED}" for step in steps)])
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split("\n")


def test_a_tensor_wise_merge_starts_without_the_whole_model_packages():
    """PLeaS and Twin bring scipy and model code: the dispatcher imports them only for their own recipes."""
    tensor_wise, pleas = _loaded_after("dispatch.parse_recipe('merge_method: linear\\nmodels: [{model: a}, {model: b}]')",
                                       "dispatch.pipeline_for('pleas')")[:2]
    assert tensor_wise == "[]"
    assert "mergekit_lite.pleas.pipeline" in pleas


def test_the_dispatcher_and_the_command_line_name_no_method():
    """Which methods exist is each pipeline's business: no method name appears as a string above them."""
    names = {"pleas", "twin", "ties", "dare_ties", "task_arithmetic", "linear", "slerp", "model_stock"}
    for module in ("dispatch.py", "cli.py", "api.py", "pipeline.py"):
        tree = ast.parse((PACKAGE / module).read_text())
        literals = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
        assert not literals & names, (module, literals & names)


def _public_functions(tree: ast.Module):
    """Module-level functions and methods of module-level classes whose names do not start with an underscore."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            yield node
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and not item.name.startswith("_"):
                    yield item


def test_every_public_function_is_typed():
    untyped = []
    for path in PACKAGE.rglob("*.py"):
        for function in _public_functions(ast.parse(path.read_text())):
            arguments = [a for a in function.args.posonlyargs + function.args.args + function.args.kwonlyargs
                         if a.arg not in ("self", "cls")]
            arguments += [a for a in (function.args.vararg, function.args.kwarg) if a is not None]
            if any(a.annotation is None for a in arguments) or function.returns is None:
                untyped.append(f"{path.relative_to(PACKAGE.parent)}:{function.lineno} {function.name}")
    assert untyped == []
