"""Package hygiene: no import cycles, no global state changed by importing hbar or a study."""

import ast
import os
import pathlib
import subprocess
import sys

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "hbar"


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _import_graph() -> dict[str, set[str]]:
    """hbar imports of every module of the package, including those inside functions (a cycle
    hidden by a function-level import is still a cycle)."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        deps: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                for alias in node.names:
                    for cand in (f"{base}.{alias.name}", base):
                        if cand in modules:
                            deps.add(cand)
                            break
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in modules)
        graph[name] = deps - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for dep in sorted(graph.get(m, ())):
            # a package's __init__ importing its own submodules is not a cycle
            if dep.startswith(m + "."):
                continue
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if state.get(dep) is None and (found := visit(dep)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if state.get(m) is None and (found := visit(m)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_import_graph_has_no_cycle():
    graph = _import_graph()
    assert "hbar.likelihood" in graph and "hbar.process" in graph["hbar.sampling"]
    assert _cycle(graph) is None


def test_importing_hbar_and_a_study_changes_no_global_state():
    """float64 stays off, `import hbar` loads neither a study nor matplotlib, and importing the
    paper study does not set a matplotlib backend or load pyplot (its global figure state)."""
    code = (
        "import sys, jax\n"
        "x64 = [jax.config.jax_enable_x64]\n"
        "import hbar\n"
        "x64.append(jax.config.jax_enable_x64)\n"
        "core = [m for m in sys.modules if m.startswith(('hbar.studies', 'matplotlib'))]\n"
        "import hbar.studies.paper2024\n"
        "import matplotlib\n"
        "x64.append(jax.config.jax_enable_x64)\n"
        "print(x64, core, 'matplotlib.pyplot' in sys.modules, matplotlib.rcParams._get_backend_or_none())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split() == ["[False,", "False,", "False]", "[]", "False", "None"], out
