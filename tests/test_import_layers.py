"""Layers that only point down: no import cycle among embedtune's own modules.

The graph counts every embedtune-internal import, top-level and function-local alike (a local import
that dodges a cycle still ties the two modules together), except those under `if TYPE_CHECKING:`.
Relative imports are resolved, `from .pkg import name` points at `pkg.name` when that is a module and
at the package otherwise, and importing `a.b.c` from outside the package `a.b` also runs `a.b`'s
`__init__`, so it counts as an edge to that package too.

Run as a script (`python tests/test_import_layers.py [src/embedtune]`) to print every cycle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "src" / "embedtune"


def _modules(package_dir: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package __init__)."""
    found = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import/ImportFrom node, with whether it sits inside a function; `if TYPE_CHECKING:` bodies skipped."""
    def visit(node: ast.AST, local: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.orelse:
                    yield from visit_one(sub, local)
                continue
            yield from visit_one(child, local)

    def visit_one(node: ast.AST, local: bool):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, local
        yield from visit(node, local or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    yield from visit(tree, False)


def import_graph(package_dir: Path = PACKAGE_DIR) -> dict[str, dict[str, list[str]]]:
    """module -> {imported module -> ["line N (top|local|package init)", ...]} over embedtune's own modules."""
    modules = _modules(package_dir)
    root = package_dir.name

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, list[str]]] = {name: {} for name in modules}
    for name, (path, is_package) in modules.items():
        here = name.split(".") if is_package else name.split(".")[:-1]
        for node, local in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = here[: len(here) - node.level + 1] if node.level else []
                full = ".".join(base + ([node.module] if node.module else []))
                if full == root or full.startswith(root + "."):
                    targets = [f"{full}.{alias.name}" if f"{full}.{alias.name}" in modules else full
                               for alias in node.names]
            else:
                targets = [alias.name for alias in node.names if alias.name == root or alias.name.startswith(root + ".")]
            for target in targets:
                found = resolve(target)
                if found is None:
                    continue
                edges = [(found, "local" if local else "top")]
                parts = found.split(".")
                # the packages above the target run their __init__ first (the root is already importing)
                edges += [(".".join(parts[:i]), "package init") for i in range(2, len(parts))]
                for dest, kind in edges:
                    where = f"line {node.lineno} ({kind})"
                    if dest != name and not name.startswith(dest + ".") and where not in graph[name].get(dest, ()):
                        graph[name].setdefault(dest, []).append(where)
    return graph


def knots(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan): modules that import each
    other, directly or through others."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
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
            if len(component) > 1:
                components.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                connect(v)
    finally:
        sys.setrecursionlimit(limit)
    return components


def find_cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """One cycle per knot, as a module path that returns to its start."""
    return [_one_cycle(graph, set(component), component[0]) for component in knots(graph)]


def _one_cycle(graph, component: set[str], start: str) -> list[str]:
    """A shortest path from `start` back to itself inside one component (breadth first)."""
    previous = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v]):
            if w == start:
                path = [v]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                return path[::-1] + [start]
            if w in component and w not in previous:
                previous[w] = v
                queue.append(w)
    return [start]


def describe(graph, cycle: list[str]) -> str:
    return "\n".join(f"  {a} -> {b}: {', '.join(graph[a][b])}" for a, b in zip(cycle, cycle[1:]))


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 30  # the whole package was read
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in src/embedtune:\n" + "\n\n".join(
        f"{' -> '.join(c)}\n{describe(graph, c)}" for c in cycles)


def test_the_graph_sees_local_imports_and_package_inits(tmp_path):
    """The checker itself: a cycle closed by a function-local import, or through a package __init__, is found."""
    pkg = tmp_path / "embedtune"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub.leaf import x\n")
    (pkg / "sub" / "__init__.py").write_text("from .other import y\n")
    (pkg / "sub" / "leaf.py").write_text("x = 1\n")
    (pkg / "sub" / "other.py").write_text("def f():\n    from embedtune import a\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n")
    graph = import_graph(pkg)
    assert graph["embedtune.a"] == {"embedtune.sub.leaf": ["line 1 (top)"], "embedtune.sub": ["line 1 (package init)"]}
    assert graph["embedtune.b"] == {}
    assert find_cycles(graph) == [["embedtune.a", "embedtune.sub", "embedtune.sub.other", "embedtune.a"]]


def test_moved_names_stay_importable_from_their_old_modules():
    """The leaves took names from modules that users and the rest of the package import them from."""
    import embedtune.evaluate
    import embedtune.exact_search
    import embedtune.hf_quiet
    import embedtune.ir_task
    import embedtune.loading
    import embedtune.lora
    import embedtune.lora_model
    import embedtune.mine
    import embedtune.model_facts
    import embedtune.save
    from embedtune.data import pairs_task

    moved = {
        embedtune.model_facts: {embedtune.loading: ["DEFAULT_MODEL_ID", "LoadInfo", "load_info", "pooling_for"],
                                embedtune.lora: ["unwrap_peft"]},
        embedtune.hf_quiet: {embedtune.loading: ["quiet_transformers"]},
        embedtune.lora_model: {embedtune.lora: ["LoraEmbeddingModel", "default_targets", "get_peft_model",
                                                "merge_lora"]},
        embedtune.ir_task: {embedtune.evaluate: ["IRTask", "IdenticalIds"]},
        pairs_task: {embedtune.evaluate: ["pairs_to_ir_task"]},
        embedtune.exact_search: {embedtune.mine: ["chunked_topk"]},
    }
    for leaf, old_homes in moved.items():
        for old, names in old_homes.items():
            for name in names:
                assert getattr(old, name) is getattr(leaf, name), f"{old.__name__}.{name}"
    assert embedtune.save.ADAPTER_PIPELINE is embedtune.model_facts.ADAPTER_PIPELINE


if __name__ == "__main__":
    where = Path(sys.argv[1]) if len(sys.argv) > 1 else PACKAGE_DIR
    graph = import_graph(where)
    found = knots(graph)
    for component in found:
        print("modules importing each other:", ", ".join(component))
        for a in component:
            for b in sorted(set(graph[a]) & set(component)):
                print(f"  {a} -> {b}: {', '.join(graph[a][b])}")
        cycle = _one_cycle(graph, set(component), component[0])
        print("  e.g.", " -> ".join(cycle))
    print(f"{len(found)} knot(s) of cyclic imports among {len(graph)} modules")
