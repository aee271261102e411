"""The real `layerwise` command in a subprocess, for the end-to-end command-line tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def layerwise(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m orchestration.cli ARGS` in `cwd` (this checkout's code, one torch thread, a split
    cache under cwd); raise with its output if it fails and `check`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LAYERWISE_CACHE_DIR": str(cwd / "cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-m", "orchestration.cli", *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"layerwise {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return out
