"""The import graph of service/: no cycles, and the surfaces that need no HTTP layer do not import it.

How it is checked: every module under service/ (and predict.py, Cog's runner) is parsed with `ast`, without
importing anything. Its edges are ALL its `import` and `from ... import` statements, wherever they are: at module
level, under `if TYPE_CHECKING:`, and inside functions (a lazy import or a type-only import is still a
dependency; hiding a cycle behind one is what this test is meant to catch). `from a.b import c` is an edge to
module a.b.c when c is a module of service/, else to a.b; imports outside service/ are ignored; importing a
submodule also runs its packages' __init__.py, so a.b.c has an edge to a.b and a.b to a. Cycles are the strongly
connected components of that graph with more than one module, or a module importing itself (Tarjan's algorithm).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "service"


def module_files() -> dict[str, Path]:
    """Module name -> file, for every module of service/ (a package is named by its __init__.py)."""
    modules = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of service/ that importing `name` (at `path`) imports directly."""
    is_package = path.name == "__init__.py"
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package upwards
                package = name.split(".") if is_package else name.split(".")[:-1]
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import service.x.y` names a module; else its package
                target = target.rpartition(".")[0]
            if target:
                edges.add(target)
    parent = name.rpartition(".")[0]
    if parent:
        edges.add(parent)  # importing a submodule runs its package's __init__.py first
    edges.discard(name) if is_package else None  # a package's own name is not an import of itself
    return edges


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def reachable(graph: dict[str, set[str]], start: set[str]) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo += graph.get(node, ())
    return seen


def test_the_checker_finds_a_cycle_and_its_members():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}, "f": set()}
    assert sorted(map(sorted, cycles(graph))) == [["a", "b", "c"], ["e"]]


def test_the_graph_sees_every_import_statement(tmp_path: Path):
    (tmp_path / "x.py").write_text(
        "from typing import TYPE_CHECKING\nimport service.config\nfrom service import errors\n"
        "from service.lora.fuse import fuse_lora\ntry:\n    import service.prompts\nexcept ImportError:\n    pass\n"
        "if TYPE_CHECKING:\n    import service.engine\ndef lazy():\n    import service.batcher\n"
    )
    edges = imports_of("service.x", tmp_path / "x.py", module_files())
    assert edges == {
        *("service", "service.config", "service.errors", "service.lora.fuse", "service.prompts"),
        *("service.engine", "service.batcher"),  # type-only and lazy imports are dependencies too
    }


def test_no_import_cycle_in_service():
    """The HTTP layer's cycle (app.py importing the OpenAI and A1111 routers, which imported app's state back) is
    gone since the routers depend on service/http/deps.py; none may come back, anywhere in service/."""
    assert [sorted(cycle) for cycle in cycles(import_graph())] == []


def test_the_batcher_and_cog_runner_do_not_import_the_http_layer():
    """Cog's runner (predict.py) has a batcher but no HTTP app: neither may pull in service/http/."""
    graph = import_graph()
    graph["predict"] = imports_of("predict", ROOT / "predict.py", module_files())
    for start in ("service.batcher", "predict"):
        http = sorted(name for name in reachable(graph, {start}) if name.startswith("service.http"))
        assert http == [], f"{start} imports {http}"
