"""The literature's data sets on the command line: `data stats --benchmarks` on the real files, the names
and `seqfile:PATH` in --help, a seqfile evaluated with HR and NDCG at 5, 10 and 20. Nothing downloads: a
folder that lacks a file is never passed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from layerwise.data import LITERATURE_METRICS
from tests.helpers.cli import layerwise

pytestmark = pytest.mark.slow  # whole file: it runs early under pytest-xdist (tests/conftest.py)

SHARED = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "amazon-yelp"
needs_shared = pytest.mark.skipif(not (SHARED / "Beauty.txt").is_file(),
                                  reason="the benchmark files are not beside the repository")
PUBLISHED_TABLE = """| file | users | items | interactions |
| --- | --- | --- | --- |
| Beauty.txt | 22,363 | 12,101 | 198,502 |
| Sports_and_Outdoors.txt | 35,598 | 18,357 | 296,337 |
| Toys_and_Games.txt | 19,412 | 11,924 | 167,597 |
| Yelp.txt | 30,431 | 20,033 | 316,354 |"""


@needs_shared
def test_data_stats_benchmarks_prints_the_published_table(tmp_path):
    out = layerwise("data", "stats", "--benchmarks", "--data-dir", str(SHARED), "--json",
                    str(tmp_path / "stats.json"), cwd=tmp_path)
    assert PUBLISHED_TABLE in out.stdout
    rows = json.loads((tmp_path / "stats.json").read_text())["benchmarks"]
    assert [r["name"] for r in rows] == ["beauty", "sports", "toys", "yelp"]
    assert all(r["matches"] and Path(r["path"]).parent == SHARED for r in rows)


def test_data_stats_benchmarks_refuses_a_changed_file(tmp_path):
    (tmp_path / "Beauty.txt").write_text("1 2 3 4\n")  # beauty is read first: no download is ever tried
    out = layerwise("data", "stats", "--benchmarks", "--data-dir", str(tmp_path), cwd=tmp_path, check=False)
    assert out.returncode == 2 and "Beauty.txt" in out.stderr and "sha256" in out.stderr
    assert "does not match the published" in out.stderr


def test_help_names_the_benchmarks_and_seqfile(tmp_path):
    for command in ("train", "evaluate", "baselines"):
        text = " ".join(layerwise(command, "--help", cwd=tmp_path).stdout.split())
        assert "beauty, sports, toys or yelp" in text and "seqfile:PATH" in text, command
        assert "--data-dir" in text
    text = " ".join(layerwise("data", "stats", "--help", cwd=tmp_path).stdout.split())
    assert "--benchmarks" in text


def _write_seqfile(path: Path, n_users: int = 80, n_items: int = 30, seed: int = 0) -> Path:
    """`user item item ...` lines; users walk the catalogue in steps of 1, so the next item is learnable."""
    rng = np.random.default_rng(seed)
    lines = []
    for user in range(1, n_users + 1):
        start, length = rng.integers(1, n_items + 1), rng.integers(4, 12)
        lines.append(" ".join(map(str, [user, *((start + t - 1) % n_items + 1 for t in range(length))])))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_seqfile_evaluation_reports_the_literature_metrics(tmp_path):
    _write_seqfile(tmp_path / "walks.txt")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    # A relative seqfile:PATH is looked up in --data-dir when it is not found as given.
    out = layerwise("evaluate", "--model", "mostpop", "--dataset", "seqfile:walks.txt", "--data-dir",
                    str(tmp_path), "--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / "m.json"),
                    cwd=elsewhere)
    header = " ".join(out.stdout.split())
    assert all(m.upper() in header for m in LITERATURE_METRICS), out.stdout
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["protocol"]["n_users"] == 80 and result["protocol"]["exclude_seen"] is True
    means = result["means"]
    assert all(0 <= means[m] <= 1 for m in LITERATURE_METRICS)
    assert means["hr@5"] <= means["hr@10"] <= means["hr@20"] and means["ndcg@5"] <= means["ndcg@20"]


def test_seqfile_that_does_not_exist_is_a_clear_error(tmp_path):
    out = layerwise("data", "stats", "--dataset", "seqfile:nowhere.txt", "--data-dir", str(tmp_path),
                    cwd=tmp_path, check=False)
    assert out.returncode == 2 and "nowhere.txt" in out.stderr and "file not found" in out.stderr
