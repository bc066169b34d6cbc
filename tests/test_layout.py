"""The package's architecture, checked: layers that import only downwards (import-linter's
contract in pyproject.toml), no import cycles between modules, every module importable on its
own, and functions short enough to read."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grimp
import pytest

from tests.conftest import REPO

PACKAGE = REPO / "src" / "segformer"

# Functions allowed past the limit, and why.
LONG_FUNCTIONS: dict[str, str] = {
    # One table of argparse options, read top to bottom; split up it would scatter them.
    "cli/serve.py:register": "argparse option table",
}
MAX_FUNCTION_LINES = 100


def module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts[-1] != "__main__":  # running it is the command line itself
            names.append(".".join(parts))
    return names


def test_layers_contract_holds():
    command = shutil.which("lint-imports")
    assert command, "import-linter is part of the test tools (bash setup.sh)"
    result = subprocess.run([command], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_no_import_cycles_between_modules():
    graph = grimp.build_graph("segformer")
    cycles = [
        (importer, imported)
        for importer in sorted(graph.modules)
        for imported in graph.find_modules_directly_imported_by(importer)
        if importer != imported and graph.find_shortest_chain(importer=imported, imported=importer)
    ]
    assert cycles == []


@pytest.mark.slow
def test_every_module_imports_on_its_own():
    """Each module in a fresh interpreter: an import that only works because another module
    happened to be imported first fails here."""

    def try_import(name: str) -> tuple[str, int, str]:
        result = subprocess.run(
            [sys.executable, "-c", f"import {name}"], capture_output=True, text=True
        )
        return name, result.returncode, result.stderr.strip().splitlines()[-1:]

    with ThreadPoolExecutor(max_workers=4) as pool:
        failures = [(name, err) for name, code, err in pool.map(try_import, module_names()) if code]
    assert failures == []


def test_functions_are_short():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                where = f"{path.relative_to(PACKAGE)}:{node.name}"
                if length > MAX_FUNCTION_LINES and where not in LONG_FUNCTIONS:
                    long.append(f"{where} ({length} lines)")
    assert long == []


def test_module_list_is_complete():
    assert "segformer.inference.backends.onnx_runtime" in module_names()
    assert all(Path(PACKAGE.parent, *n.split(".")).parent.exists() for n in module_names())
