"""The import rule: model <- runtime <- bundle <- export | engines | training | serving <- bench <- commands.

Every `import` in the package counts, including those inside functions. A module may import its own
layer and the layers below it, never one above; export, engines, training and serving are
independent of each other; nothing imports the commands. No import cycle anywhere, inside a layer either.
Run as a script (`python tests/test_layers.py`) it prints every violation and exits 1 on any.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {
    "haplo": ROOT / "haplo",
    "haplo.export": ROOT / "export",
    "haplo.engines": ROOT / "engines",
    "haplo.bench": ROOT / "bench",
}
# Layer of a module: its longest matching prefix. Lower numbers sit lower.
LAYERS = {
    "haplo": 0,  # haplo/__init__, errors, artifacts, cpuinfo, video: what everything may use
    "haplo.model": 1,
    "haplo.runtime": 2,
    "haplo.bundle": 3,
    "haplo.export": 4,
    "haplo.engines": 4,
    "haplo.training": 4,
    "haplo.serving": 4,
    "haplo.bench": 5,
    "haplo.commands": 6,
}


def module_files() -> dict[str, Path]:
    """Every module of the installed package, by dotted name, from the source folders."""
    modules = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            modules[".".join((package, *parts)).removesuffix(".__init__")] = path
    return modules


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """Modules of the package that `path` imports anywhere in its body."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != name}


def layer_of(module: str) -> str:
    return max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports that go up a layer or across independent layers."""
    found = []
    for module, targets in sorted(graph.items()):
        mine = layer_of(module)
        for target in sorted(targets):
            theirs = layer_of(target)
            if theirs != mine and LAYERS[theirs] >= LAYERS[mine]:
                found.append(f"{module} imports {target}: {theirs} is not below {mine}")
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def package_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(path, name, set(files)) for name, path in files.items()}


def test_the_package_is_found():
    graph = package_graph()
    for module in ("haplo.model.modeling", "haplo.runtime.decoding", "haplo.export.build", "haplo.commands.main"):
        assert module in graph
    assert "haplo.model.vae" in graph["haplo.runtime.torch_backend"]  # a module import, not the package


def test_no_import_goes_up_or_across():
    assert violations(package_graph()) == []


def test_no_import_cycle():
    assert cycles(package_graph()) == []


def test_the_checks_catch_what_they_forbid():
    assert violations({"haplo.model.modeling": {"haplo.runtime.decoding"}})  # up
    assert violations({"haplo.export.build": {"haplo.engines.onnxruntime"}})  # across
    assert violations({"haplo.bench.runner": {"haplo.commands.main"}})  # into the leaf
    assert not violations({"haplo.runtime.decoding": {"haplo.model.sequence", "haplo.runtime.sampling"}})
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_relative_and_lazy_imports_count(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from haplo.runtime import decoding\n    from . import sequence\n")
    known = {"haplo.runtime.decoding", "haplo.model.sequence", "haplo.model.mod"}
    assert imports_of(source, "haplo.model.mod", known) == {"haplo.runtime.decoding", "haplo.model.sequence"}


if __name__ == "__main__":
    graph = package_graph()
    problems = violations(graph) + [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    print("\n".join(problems) or f"import rule holds over {len(graph)} modules")
    sys.exit(1 if problems else 0)
