"""The data benchmark runs end to end on a small size and reports what it claims.

It runs in its own process, as it is run for real: its peak RSS is the process's high-water mark, and a
pytest worker's would include whatever tests ran there before it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_data_small_run_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "benchmarks/bench_data.py", "--users", "300", "--items", "100",
                          "--interactions", "4000", "--json", str(out), "--check"],
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    assert result["data"]["users"] == 300 and result["data"]["interactions"] == 4000
    assert result["total_s"] >= result["generate_s"] > 0 and result["meets_targets"] is True
    assert 0 < result["peak_rss_gib_after_split"] <= result["peak_rss_gib"]
    assert "build_sequences" in run.stdout
