"""The library never imports ray, mlflow or deepspeed: it must run and test in a plain process."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import layerwise

FORBIDDEN = {"ray", "mlflow", "deepspeed", "optuna"}
ROOT = Path(layerwise.__file__).parent


def imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_library_file_imports_orchestration_packages():
    offenders = {}
    for path in ROOT.rglob("*.py"):
        bad = (imported_top_levels(path) & FORBIDDEN) | ({"orchestration", "serve"} & imported_top_levels(path))
        if bad:
            offenders[str(path.relative_to(ROOT.parent))] = sorted(bad)
    assert not offenders, f"library files import glue packages: {offenders}"


def test_importing_every_library_module_loads_none_of_them():
    modules = sorted(
        ".".join(p.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
        for p in ROOT.rglob("*.py"))
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            f"print(sorted(m for m in {sorted(FORBIDDEN)!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    assert len(modules) > 15
