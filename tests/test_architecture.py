"""The layout's promises: no import cycles, spaces independent of the search and the front ends, no
space named outside ``spaces/``."""

import ast
from pathlib import Path

import evopress
from evopress.spaces import PLUGINS

SRC = Path(evopress.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (annotations only, never imported at run time)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """evopress modules ``path`` imports, at module level or inside functions."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    return {name: imports_of(path, set(files)) for name, path in files.items()}


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
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    graph = import_graph()
    assert "evopress.spaces.sparsity.space" in graph and "evopress.spaces.layerwise" in graph["evopress.spaces.sparsity.space"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_spaces_import_neither_the_search_nor_the_front_ends():
    front = {f"evopress.{m}" for m in ("evolution", "pipeline", "cli", "api", "recipe", "distributed", "report",
                                          "front")}
    for name, imported in import_graph().items():
        if name.startswith("evopress.spaces"):
            reached = {m for m in imported if m in front or m.rsplit(".", 1)[0] in front}  # a package's modules too
            assert not reached, f"{name} imports {reached}"


def test_no_space_is_named_outside_spaces():
    """Dispatch goes through the registry: a space's name as a string appears only under spaces/."""
    names = set(PLUGINS) | {"drop", "sparsity", "quant"}
    for path in SRC.rglob("*.py"):
        if "spaces" in path.relative_to(SRC).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                raise AssertionError(f"{path.relative_to(SRC)}:{node.lineno} names space {node.value!r}")
