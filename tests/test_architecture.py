"""Dependencies point down: pages -> analysis -> models; no streamlit below pages; no import cycles.

Every import counts, also one inside a function: a lazy import hides a cycle, it does not remove it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "analysis", "pages")
# The page benchmark drives the app through streamlit's AppTest, as a user would; nothing else below pages may.
STREAMLIT_ALLOWED = {"analysis.bench.pages"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    found = {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    found["app"] = ROOT / "app.py"
    return found


def _imports(name: str, path: Path) -> set[str]:
    """Every module named in an import statement anywhere in the file (absolute, or relative resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(name, path) if m in modules and m != name}
    return graph


def test_nothing_below_pages_imports_streamlit():
    offenders = sorted(name for name, path in _modules().items()
                       if not name.startswith("pages") and name != "app" and name not in STREAMLIT_ALLOWED
                       and any(m == "streamlit" or m.startswith("streamlit.") for m in _imports(name, path)))
    assert not offenders, f"streamlit imported below pages/: {offenders}"


def test_models_never_import_analysis_or_pages():
    graph = _graph()
    offenders = sorted((a, b) for a, deps in graph.items() if a.startswith("models")
                       for b in deps if not b.startswith("models"))
    assert not offenders, f"models/ must not depend on higher layers: {offenders}"


def test_analysis_never_imports_pages():
    graph = _graph()
    offenders = sorted((a, b) for a, deps in graph.items() if a.startswith("analysis")
                       for b in deps if b.startswith("pages") or b == "app")
    assert not offenders, offenders


def test_no_import_cycles():
    graph = _graph()
    names = sorted(graph)
    index = {n: i for i, n in enumerate(names)}
    rows = [index[a] for a in names for b in graph[a]]
    cols = [index[b] for a in names for b in graph[a]]
    matrix = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(names), len(names)))
    count, labels = connected_components(matrix, directed=True, connection="strong")
    cycles = [sorted(n for n in names if labels[index[n]] == label)
              for label in range(count) if (labels == label).sum() > 1]
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_a_function_level_cycle(tmp_path):
    """The cycle test would catch a lazy import that closes a loop."""
    path = tmp_path / "x.py"
    path.write_text("def f():\n    from models import weights\n    from .sibling import thing\n")
    assert {"models", "models.weights"} <= _imports("analysis.x", path)
    assert "analysis.sibling" in _imports("analysis.x", path)


# Inside analysis/, kinds stack too: the timing infrastructure and the shared data helpers at the bottom, one
# package per analysis above them, and the command-line and dataset-run layers (throughput, runs, bench) on top.
ANALYSIS_BASE = ("analysis.timing", "analysis.data", "analysis.provenance")
ANALYSIS_TOP = ("analysis.throughput", "analysis.runs", "analysis.run", "analysis.bench", "analysis.timing_env",
                "analysis.tome_agreement", "analysis.train_dynamicvit")


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_timing_imports_no_analysis():
    graph = _graph()
    offenders = sorted((a, b) for a, deps in graph.items() if _within(a, ("analysis.timing",))
                       for b in deps if b.startswith("analysis") and b != "analysis" and not _within(b, ANALYSIS_BASE))
    assert not offenders, f"analysis/timing/ is infrastructure: it imports no analysis: {offenders}"


def test_analyses_import_no_runs_or_command_lines():
    graph = _graph()
    analyses = [a for a in graph if a.startswith("analysis.") and not _within(a, ANALYSIS_BASE + ANALYSIS_TOP)]
    offenders = sorted((a, b) for a in analyses for b in graph[a] if _within(b, ANALYSIS_TOP))
    assert not offenders, f"an analysis depends on a dataset run or a command line: {offenders}"


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 500, 60


def test_no_module_over_500_lines_and_no_function_over_60():
    too_long = []
    for name, path in _modules().items():
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    assert not too_long, too_long
