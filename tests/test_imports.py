"""The package's modules import each other in layers: no import circle inside csm_jax.

Every `import csm_jax...` and `from csm_jax... import ...` statement of every module counts, those inside
functions too (an import deferred to call time still ties the two modules together). An edge goes to the
module that the statement loads: `from csm_jax import llama` and `from csm_jax.llama import linear` both
point at csm_jax.llama, `from csm_jax.mimi import decode` at the package csm_jax.mimi (its __init__).
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "csm_jax"


def module_names() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("csm_jax",) + path.relative_to(PACKAGE).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(name: str, path: Path, modules) -> set[str]:
    """The csm_jax modules that the module `name` (file `path`) imports anywhere in its code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..y import z
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` loads the submodule sub when there is one, else a name of pkg
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
    return {_owner(m, modules) for m in found if m.split(".")[0] == "csm_jax"} - {name, None}


def _owner(dotted: str, modules) -> str | None:
    """The longest prefix of a dotted name that is one of the package's modules."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as [a, b, ..., a], or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"y"}}) == ["y", "y"]


def test_imports_are_read_from_every_statement_form():
    modules = module_names()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert "csm_jax.llama" in graph["csm_jax.csm"]        # from csm_jax import llama
    assert "csm_jax.sampling" in graph["csm_jax.csm"]     # from csm_jax.sampling import sample
    assert "csm_jax.mimi" in graph["csm_jax.bundle"]      # from csm_jax.mimi import decode (the package)
    assert "csm_jax.mimi.model" in graph["csm_jax.mimi"]  # the package's own imports


def test_no_import_cycle_inside_csm_jax():
    modules = module_names()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
