"""The arrows between quiver's parts run one way: no import cycles, and the trainer never imports the gateway.

Read from the source with `ast` (nothing is imported), counting every import: module level, inside functions
and under TYPE_CHECKING alike, since each is a dependency a change has to respect.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The folders and the package names they install under (pyproject's [tool.setuptools.package-dir]).
PACKAGES = {"quiver": ROOT / "server", "quiver.training": ROOT / "training", "quiver.common": ROOT / "common"}
# What `quiver.training` may import from `quiver.*`: itself and the common package.
TRAINING_MAY_IMPORT = ("quiver.training", "quiver.common")


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _modules() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The deepest known module that `name` (a module or a name inside one) refers to."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package, `level` steps up
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                if target.split(".")[0] != "quiver":
                    continue
                resolved = _resolve(target, modules)
                if resolved and resolved != name:
                    graph[name].add(resolved)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_the_graph_is_read_from_the_source() -> None:
    graph = import_graph()
    # A known arrow of each kind, so an empty or misparsed graph cannot pass the checks below.
    assert "quiver.training.encoding" in graph["quiver.training.data"]
    assert "quiver.common.base_model" in graph["quiver.training.trainer"]
    assert "quiver.training.data" in graph["quiver.finetuning.service"]


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_there_are_no_import_cycles() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(cycle) for cycle in cycles)


def test_the_trainer_does_not_import_the_gateway() -> None:
    crossings = sorted(
        f"{module} -> {target}"
        for module, targets in import_graph().items() if _within(module, "quiver.training")
        for target in targets if not any(_within(target, allowed) for allowed in TRAINING_MAY_IMPORT)
    )
    assert not crossings, "quiver.training imports the gateway: " + ", ".join(crossings)


def test_the_common_package_imports_neither() -> None:
    crossings = sorted(
        f"{module} -> {target}"
        for module, targets in import_graph().items() if _within(module, "quiver.common")
        for target in targets if not _within(target, "quiver.common")
    )
    assert not crossings, "quiver.common imports the gateway or the trainer: " + ", ".join(crossings)
