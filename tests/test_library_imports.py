"""The library never imports ray, mlflow or deepspeed: it must run and test in a plain process. And inside
the library, the models never import the compression code: compression builds on models, not back."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import layerwise

FORBIDDEN = {"ray", "mlflow", "deepspeed", "optuna"}
ROOT = Path(layerwise.__file__).parent


# What layerwise/models/ may import from the library: itself and the data it is built for. Everything else
# there (bridges, compact, compress, distill, importance, select, ...) is compression code.
MODELS_MAY_IMPORT = ("layerwise.models", "layerwise.data")


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name a file imports, at module level or inside a function."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def imported_top_levels(path: Path) -> set[str]:
    return {name.split(".")[0] for name in imported_modules(path)}


def test_no_library_file_imports_orchestration_packages():
    offenders = {}
    for path in ROOT.rglob("*.py"):
        bad = (imported_top_levels(path) & FORBIDDEN) | ({"orchestration", "serve"} & imported_top_levels(path))
        if bad:
            offenders[str(path.relative_to(ROOT.parent))] = sorted(bad)
    assert not offenders, f"library files import glue packages: {offenders}"


def test_models_never_import_the_compression_code():
    offenders = {}
    for path in (ROOT / "models").rglob("*.py"):
        bad = {m for m in imported_modules(path) if m.split(".")[0] == "layerwise"
               and not any(m == ok or m.startswith(ok + ".") for ok in MODELS_MAY_IMPORT)}
        if bad:
            offenders[str(path.relative_to(ROOT.parent))] = sorted(bad)
    assert not offenders, f"layerwise/models/ imports compression code: {offenders}"


def test_importing_every_library_module_loads_none_of_them():
    """One fresh interpreter (importing the families costs seconds): first every models module, which must
    load nothing of the library but models and data, then every library module, which must load no glue."""
    modules = sorted(
        ".".join(p.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
        for p in ROOT.rglob("*.py"))
    models = [m for m in modules if m.startswith("layerwise.models")]
    code = ("import importlib, sys\n"
            f"for m in {models!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.startswith('layerwise.') and not m.startswith("
            f"{MODELS_MAY_IMPORT!r})))\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            f"print(sorted(m for m in {sorted(FORBIDDEN)!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["[]", "[]"], out.stdout + out.stderr
    assert len(modules) > 15 and len(models) > 5
