"""The import rules of docs/architecture.md, checked on the source (no imports are executed).

Every `import` and `from ... import` statement counts, including those inside functions: a lazy
import is still a dependency, and a cycle through one only shows up at an unlucky moment.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stylemix", "trainers", "ui")  # ui/: the app's tab builders (top level, next to app.py)
TOP_MODULES = ("app",)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")) if (ROOT / package).is_dir() else []:
            found[_module_name(path)] = path
    for name in TOP_MODULES:
        if (ROOT / f"{name}.py").is_file():
            found[name] = ROOT / f"{name}.py"
    return found


def imported_names(module: str, path: Path) -> set[str]:
    """Every module name `path` imports, as written (relative imports resolved)."""
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return names


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        edges = set()
        for name in imported_names(module, path):
            # the longest project module the name refers to: `stylemix.lora.files.X` -> stylemix.lora.files
            parts = name.split(".")
            while parts and ".".join(parts) not in modules:
                parts.pop()
            if parts and ".".join(parts) != module:
                edges.add(".".join(parts))
        graph[module] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles():
    assert find_cycles(import_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_library_imports_neither_trainers_nor_the_ui():
    """stylemix/ is the library: trainers/ may import it, never the reverse; gradio stays in app.py and ui/."""
    bad = []
    for module, path in project_modules().items():
        if not module.startswith("stylemix"):
            continue
        for name in imported_names(module, path):
            top = name.split(".")[0]
            if top in ("trainers", "gradio", "ui", "app"):
                bad.append(f"{module} imports {name}")
    assert bad == []


def test_trainers_do_not_import_the_ui():
    bad = [f"{m} imports {n}" for m, p in project_modules().items() if m.startswith("trainers")
           for n in imported_names(m, p) if n.split(".")[0] in ("gradio", "ui", "app")]
    assert bad == []


def test_tabs_do_not_import_the_app():
    bad = [f"{m} imports {n}" for m, p in project_modules().items() if m.startswith("ui")
           for n in imported_names(m, p) if n.split(".")[0] == "app"]
    assert bad == []


def test_build_demo_stays_short():
    """app.build_demo calls one builder per tab; the tabs' layout and events live in ui/."""
    tree = ast.parse((ROOT / "app.py").read_text(encoding="utf-8"))
    (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "build_demo"]
    assert fn.end_lineno - fn.lineno + 1 <= 120
