"""The package's modules import each other without cycles (function-level imports included)."""

from __future__ import annotations

import ast
import os

import unilora_kernels

PACKAGE = "unilora_kernels"


def _modules(root: str) -> dict:
    """{dotted module name: path} of every module of the installed package (compiled ones too)."""
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith((".so", ".pyd")):  # an extension module: imports nothing of ours
                rel = os.path.relpath(os.path.join(folder, name.split(".")[0]), root).split(os.sep)
                found[".".join([PACKAGE] + rel)] = None
                continue
            if not name.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(folder, name), root)[: -len(".py")].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            found[".".join([PACKAGE] + rel)] = os.path.join(folder, name)
    return found


def _imports(module: str, path: str, known: set) -> set:
    """Package modules that ``module`` imports anywhere in its source (any nesting level)."""
    is_package = path.endswith("__init__.py")
    package = module if is_package else module.rpartition(".")[0]
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read(), path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from pkg import mod` imports the module pkg.mod
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in known else target)
    return {m for m in out if m in known and m != module}


def _import_graph() -> dict:
    root = os.path.dirname(unilora_kernels.__file__)
    mods = _modules(root)
    return {m: (_imports(m, p, set(mods)) if p else set()) for m, p in mods.items()}


def _find_cycle(graph: dict):
    """One cycle as a list of modules, or None (iterative DFS, white/grey/black)."""
    state = {m: 0 for m in graph}
    for start in graph:
        if state[start]:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state[child] == 1:
                return path[path.index(child):] + [child]
            elif state[child] == 0:
                state[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


def test_no_import_cycle():
    graph = _import_graph()
    # The package's __init__ imports its public modules; a submodule importing the package root
    # would close a cycle through it, so it is in the graph like any other module.
    assert len(graph) > 10 and f"{PACKAGE}.ops" in graph[PACKAGE]
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checker_sees_function_level_imports():
    graph = {"a": {"b"}, "b": {"a"}}
    assert _find_cycle(graph) in (["a", "b", "a"], ["b", "a", "b"])
    tree_src = "def f():\n    from . import ops\n"
    path = os.path.join(os.path.dirname(unilora_kernels.__file__), "_probe_for_test.py")
    try:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(tree_src)
        assert _imports(f"{PACKAGE}._probe_for_test", path, {f"{PACKAGE}.ops"}) == {f"{PACKAGE}.ops"}
    finally:
        os.remove(path)


def test_kernel_layer_does_not_import_the_user_facing_layer():
    """backends/ (and the Triton sources) never import config, layer, model, peft_io or plan."""
    graph = _import_graph()
    upper = {f"{PACKAGE}.{m}" for m in ("config", "layer", "model", "peft_io", "bank", "plan")}
    for module, deps in graph.items():
        if module.startswith(f"{PACKAGE}.backends") or module.startswith(f"{PACKAGE}.triton_kernels"):
            assert not deps & upper, f"{module} imports {sorted(deps & upper)}"
