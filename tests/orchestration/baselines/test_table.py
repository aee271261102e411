"""`layerwise baselines`: the real command on a tiny trained teacher writes one table (JSON and Markdown)
in which every row was measured alike."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from layerwise.baselines.quantization import quantize_int8
from layerwise.data import LITERATURE_METRICS, load_dataset
from layerwise.models.checkpoint import save_recommender
from layerwise.training.train import TrainConfig, train_recommender
from orchestration.baselines.table import _memory
from orchestration.cli.main import main
from tests.helpers.tiny_models import tiny_model

TRAIN = TrainConfig(epochs=6, batch_size=32, lr=1e-2, max_len=12, patience=6, eval_every=6)


def test_table_command_end_to_end(tmp_path):
    spec = "synthetic:40:30:400:0"
    data = load_dataset(spec)
    teacher = tiny_model("llama", n_layers=4, n_items=data.n_items)
    train_recommender(teacher, data, TRAIN, progress=False)
    save_recommender(teacher, tmp_path / "teacher", {"kind": "teacher", "data_fingerprint": data.fingerprint,
                                                     "max_len": 12, "train": asdict(TRAIN)})
    assert main(["baselines", "--teacher", str(tmp_path / "teacher"), "--dataset", spec, "--cache-dir",
                 str(tmp_path / "cache"), "--keep", "0.5", "--json", str(tmp_path / "t.json"), "--md",
                 str(tmp_path / "t.md"), "--only", "mostpop", "first", "magnitude", "int8", "--heal-epochs", "1",
                 "--bridge-rank", "4", "--seeds", "0", "--runs", "3", "--no-memory"]) == 0
    result = json.loads((tmp_path / "t.json").read_text())
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == ["teacher", "ours", "ours +heal", "mostpop", "first", "first +heal", "magnitude",
                          "magnitude +heal", "int8"]
    assert rows["teacher"]["retention"]["ndcg@10"] == pytest.approx(1.0)
    assert rows["first +heal"]["n_layers"] == 2 and rows["ours +heal"]["training"][0]["epochs_run"] == 1
    table = (tmp_path / "t.md").read_text()
    for name in ("teacher", "first +heal", "magnitude", "int8"):
        assert set(rows[name]["speed"]) == {"1", "64"}
        for speed in rows[name]["speed"].values():  # a result, or marked disturbed with no figure
            assert speed["speedup"] > 0 if speed["status"] == "ok" else speed["disturbed_because"]
            assert speed["status"] == "ok" or (speed["speedup"] is None and "disturbed (not a result)" in table)
    assert rows["teacher"]["speed"]["1"]["speedup"] == pytest.approx(1.0) and rows["mostpop"]["speed"] is None
    timing = result["benchmark"]["models"]  # the Amdahl bound only where the layers are the teacher's
    assert timing["int8"]["batches"]["64"]["bound"] is None
    assert timing["magnitude"]["batches"]["64"]["bound"] == pytest.approx(1.0)  # dense zeros: at most 1x
    assert "Bench guard:" in table
    assert rows["magnitude"]["weight_bytes"] == rows["teacher"]["weight_bytes"] > rows["int8"]["weight_bytes"]
    assert 0 < result["budget"]["removed"] < result["budget"]["teacher_parameters"]
    assert all(f"| {name} |" in table for name in rows)
    # The literature's HR and NDCG at 5, 10 and 20 are columns, and every row has a value for each.
    header = next(line for line in table.splitlines() if line.startswith("| method |"))
    assert all(f" {m.upper()} |" in header for m in LITERATURE_METRICS)
    assert all(0 <= rows[name]["metrics"][m] <= 1 for name in rows for m in LITERATURE_METRICS)



def test_quantized_models_are_reported_not_measured_for_peak_memory():
    teacher = tiny_model("llama", n_layers=4)
    memory = _memory({"int8": quantize_int8(teacher)}, "unused", batch=4, max_len=12)
    assert memory["int8"]["status"] == "not measured" and "quantized" in memory["int8"]["reason"]
