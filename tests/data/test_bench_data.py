"""The data benchmark runs end to end on a small size and reports what it claims."""

import json

from benchmarks.bench_data import main


def test_bench_data_small_run_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--users", "300", "--items", "100", "--interactions", "4000", "--json", str(out), "--check"]) == 0
    result = json.loads(out.read_text())
    assert result["data"]["users"] == 300 and result["data"]["interactions"] == 4000
    assert result["total_s"] >= result["generate_s"] > 0 and result["meets_targets"] is True
    assert 0 < result["peak_rss_gib_after_split"] <= result["peak_rss_gib"]
    assert "build_sequences" in capsys.readouterr().out
