"""The layout stays one-way and small: which folder may import which, function and module sizes."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ALLOWED = {   # docs/design.md, "Code layout"
    "core": set(),
    "dataio": {"core"},
    "assets": {"core"},
    "models": {"core"},
    "artifacts": {"core", "dataio"},
    "method": {"core", "dataio", "artifacts"},
    "tasks": {"core", "dataio", "assets", "models", "artifacts", "method"},
    "flows": {"core"},   # the typed config validates a run's params overrides
}


def _modules():
    for folder in ALLOWED:
        yield from sorted((REPO / folder).glob("*.py"))


def _project_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
        found |= {n.split(".")[0] for n in names} & set(ALLOWED)
    return found


@pytest.mark.parametrize("path", list(_modules()), ids=lambda p: str(p.relative_to(REPO)))
def test_imports_run_one_way(path):
    folder = path.parent.name
    assert _project_imports(path) - {folder} <= ALLOWED[folder]


def test_no_function_over_80_lines_and_no_module_over_600():
    too_long = []
    for path in [*_modules(), *sorted((REPO / "bench").glob("*.py")), *sorted((REPO / "tests").glob("*.py"))]:
        text = path.read_text()
        if len(text.splitlines()) > 600:
            too_long.append(f"{path.relative_to(REPO)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                too_long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: "
                                f"{node.end_lineno - node.lineno + 1} lines")
    assert too_long == []
