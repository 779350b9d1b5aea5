"""The package's shape, checked from its source (no import): no import cycle between its
modules (imports inside functions included), the leaves stay leaves, the API never reaches
into the CLI, and no module grows past a size one reader can hold."""

from __future__ import annotations

import ast

import pytest

from conftest import ROOT

PACKAGE = ROOT / "chatglm3"
MAX_LINES = 400


def module_name(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path) -> set[str]:
    """The chatglm3 modules `path` imports, anywhere in it (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("chatglm3")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if not target.startswith("chatglm3"):
                continue
            found.add(target)
            # `from . import x` / `from .api import serve`: x may be a module itself
            found |= {f"{target}.{a.name}" for a in node.names}
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p): p for p in paths}
    return {m: {i for i in imports(p) if i in modules and i != m} for m, p in modules.items()}


def test_no_import_cycles(graph) -> None:
    """Depth-first search; a cycle is reported as its path."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if n == "chatglm3" or m.startswith(n + "."):
                continue  # a package's __init__ is not a dependency of its own modules
            if state.get(n) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


@pytest.mark.parametrize("leaf", ["chatglm3.errors", "chatglm3.host_memory"])
def test_leaves_import_nothing_of_ours(graph, leaf) -> None:
    assert graph[leaf] == set()


def test_openmp_imports_only_host_memory(graph) -> None:
    assert graph["chatglm3.openmp"] == {"chatglm3.host_memory"}


def test_light_modules_stay_light(graph) -> None:
    """What the CLI needs before loading a model imports no torch (a bad flag costs no 5 s)."""
    for m in ("chatglm3.params", "chatglm3.settings", "chatglm3.cli_args", "chatglm3.errors"):
        tree = ast.parse((PACKAGE / (m.split(".", 1)[1] + ".py")).read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                 for a in n.names}
        names |= {(n.module or "").split(".")[0] for n in ast.walk(tree)
                  if isinstance(n, ast.ImportFrom) and not n.level}
        assert not names & {"torch", "transformers", "numpy"}, m
    assert graph["chatglm3.params"] <= {"chatglm3.errors"}


def test_the_api_never_imports_the_cli(graph) -> None:
    api = [m for m in graph if m.startswith("chatglm3.api")]
    assert api and not any(n.startswith("chatglm3.cli") for m in api for n in graph[m])


LEAVES = {"chatglm3.params", "chatglm3.settings", "chatglm3.errors", "chatglm3.devices",
          "chatglm3.host_memory", "chatglm3.openmp"}
# What each folder may import besides itself and the leaves (docs/architecture.md, "Folders").
FOLDERS = {
    "chatglm3.text": set(),
    "chatglm3.model": {"chatglm3.text", "chatglm3.engine.scheduler", "chatglm3.engine.rows"},
    "chatglm3.weights": {"chatglm3.text", "chatglm3.model"},
    "chatglm3.engine": {"chatglm3.text", "chatglm3.model", "chatglm3.weights"},
}


@pytest.mark.parametrize("folder", sorted(FOLDERS))
def test_folders_import_only_what_their_layer_may(graph, folder) -> None:
    allowed = FOLDERS[folder] | LEAVES | {folder}
    for m in (m for m in graph if m.startswith(folder + ".")):
        for n in graph[m]:
            assert any(n == a or n.startswith(a + ".") for a in allowed), f"{m} imports {n}"
    assert any(m.startswith(folder + ".") for m in graph), folder


def test_text_imports_no_torch() -> None:
    for path in (PACKAGE / "text").glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                 for a in n.names}
        names |= {(n.module or "").split(".")[0] for n in ast.walk(tree)
                  if isinstance(n, ast.ImportFrom) and not n.level}
        assert "torch" not in names, path


def test_no_module_is_too_long() -> None:
    long = {module_name(p): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
