"""The package's imports point one way: no module imports, directly or through others, a module that imports it,
and training never reaches up into a front-end (read from the source, lazy imports inside functions included)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dpa4_jax"
FRONT_ENDS = ("dpa4_jax.calculator", "dpa4_jax.evaluate", "dpa4_jax.serve")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports (``from a import b`` is module ``a.b`` when that exists)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: up node.level - 1 packages from this one
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
    return {m for m in found if m in modules and m != name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, modules) for p in files}


def reachable(graph, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_no_import_cycle(graph):
    # The package's __init__ exposes DPA4 and DPA4Calculator lazily (module __getattr__); importing a submodule
    # runs it, so it stands above everything and is left out of the walk.
    inner = {m: deps - {"dpa4_jax"} for m, deps in graph.items() if m != "dpa4_jax"}
    assert len(inner) > 40  # the whole package was read
    cycles = sorted(m for m in inner if m in reachable(inner, m))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_training_does_not_import_front_ends(graph):
    training = [m for m in graph if m.startswith("dpa4_jax.train")]
    assert "dpa4_jax.train.loop" in training
    for module in training:
        reached = reachable({m: d - {"dpa4_jax"} for m, d in graph.items()}, module)
        assert not reached & set(FRONT_ENDS), f"{module} imports {sorted(reached & set(FRONT_ENDS))}"
