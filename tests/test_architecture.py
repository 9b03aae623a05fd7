"""Imports run one way: the import graph of ``rllib_ext`` and ``src/cvpo``, read with ``ast``.

Every ``import`` and ``from ... import`` counts, at module level and inside
functions alike (a lazy import still ties two modules together). Asserted:

* no cycle among the modules of ``rllib_ext`` (nor of ``cvpo``);
* ``src/cvpo`` imports neither ``ray`` nor ``rllib_ext`` (it is the Ray-free core);
* the runtime package (algorithms, envs, checkpoints) imports neither the
  ``rllib`` command (``rllib_ext.cli``) nor ``rllib_ext.reproduce``: those sit on top.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"rllib_ext": ROOT / "rllib_ext", "cvpo": ROOT / "src" / "cvpo"}
#: entry points: modules of these names may import anything in the package
ENTRY_POINTS = ("rllib_ext.cli", "rllib_ext.reproduce")


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    where: str  # file:line of the import statement

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} ({self.where})"


def _module_name(package: str, root: Path, path: Path) -> str:
    parts = [package, *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def find_modules() -> dict[str, Path]:
    """{dotted module name: file} of every module of :data:`PACKAGES`."""
    modules = {}
    for package, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            modules[_module_name(package, root, path)] = path
    return modules


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([name] if name else []))


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(dotted name, line) of everything a module imports, anywhere in the file.

    ``from X import a`` names ``X.a`` when that is one of our modules, else ``X``;
    ``import X.Y`` names ``X.Y``. The parent packages Python imports implicitly
    on the way are not counted: only what the statement asks for.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = _resolve_relative(module, is_package, node.level, node.module)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                names.append((sub if sub in modules else base, node.lineno))
    return names


def _own_module(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is one of our modules (None: a third-party name)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def build_graph() -> tuple[dict[str, set[str]], list[Edge], dict[str, set[str]]]:
    """(module -> our modules it imports, those edges with their lines, module -> the
    top-level names (third-party or ours) it imports)."""
    modules = find_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    edges: list[Edge] = []
    top_level: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        where_file = path.relative_to(ROOT)
        for name, line in imports_of(module, path, modules):
            top_level[module].add(name.split(".")[0])
            target = _own_module(name, modules)
            if target is None or target == module or target in graph[module]:
                continue
            graph[module].add(target)
            edges.append(Edge(module, target, f"{where_file}:{line}"))
    return graph, edges, top_level


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


@pytest.fixture(scope="module")
def import_graph():
    return build_graph()


def _describe(cycle: list[str], edges: list[Edge]) -> str:
    inside = [str(e) for e in edges if e.source in cycle and e.target in cycle]
    return " <-> ".join(cycle) + "\n    " + "\n    ".join(inside)


def test_the_graph_sees_function_level_imports(import_graph):
    graph, _, _ = import_graph
    # rllib_ext.cli.train imports CVPO inside a function only
    assert "rllib_ext.cvpo" in graph["rllib_ext.cli.train"]
    assert "rllib_ext.checkpoints" in graph["rllib_ext.common.off_policy"]


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_cycles(import_graph, package):
    graph, edges, _ = import_graph
    cycles = [c for c in find_cycles(graph) if any(m.split(".")[0] == package for m in c)]
    assert not cycles, "import cycles:\n" + "\n".join(_describe(c, edges) for c in cycles)


def test_cvpo_core_imports_no_ray_and_no_rllib_ext(import_graph):
    _, _, top_level = import_graph
    bad = {
        m: sorted(names & {"ray", "rllib_ext"})
        for m, names in top_level.items()
        if m.split(".")[0] == "cvpo" and names & {"ray", "rllib_ext"}
    }
    assert not bad, f"src/cvpo must stay Ray-free: {bad}"


def test_runtime_package_does_not_import_the_entry_points(import_graph):
    _, edges, _ = import_graph

    def is_entry(m: str) -> bool:
        return any(m == e or m.startswith(e + ".") for e in ENTRY_POINTS)

    bad = [str(e) for e in edges if is_entry(e.target) and not is_entry(e.source)]
    assert not bad, "the runtime package imports an entry point:\n" + "\n".join(bad)


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


# -- habits: the style pyproject.toml declares is the style of the code --------------------
LINT_PATHS = ["src", "rllib_ext", "tests", "benchmarks", "cluster", "tuned_examples"]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff_passes(command):
    """``make lint``: ruff's rules (line length 100, pyupgrade, imports) and its format."""
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    # ruff comes with the [test] extra, like pytest itself: `make install` always has it
    assert ruff is not None, "ruff is missing: run `make install` (the [test] extra)"
    out = subprocess.run([ruff, *command, *LINT_PATHS], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
