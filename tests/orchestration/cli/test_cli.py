"""End to end: the real `layerwise` command on tiny synthetic data, checking the numbers it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.cli import REPO, layerwise

pytestmark = pytest.mark.slow  # whole file: it runs early under pytest-xdist (tests/conftest.py)

DATASET = "synthetic:240:60:4000:1"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def teacher(workdir):
    layerwise("train", "--dataset", DATASET, "--cache-dir", str(workdir / "cache"), "--family", "llama",
              "--preset", "tiny", "--epochs", "6", "--lr", "0.003", "--max-len", "20",
              "--out", str(workdir / "teacher"), cwd=workdir)
    return workdir / "teacher"


def test_help_lists_every_command(workdir):
    out = layerwise("--help", cwd=workdir).stdout
    for command in ("data", "train", "evaluate", "score", "compress", "bench", "run"):
        assert command in out


def test_the_parser_imports_no_torch_ray_or_mlflow():
    """`layerwise --help` (and every command's startup) builds the whole parser: it must stay light."""
    code = ("import sys; from orchestration.cli.main import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_data_synth_then_stats(workdir):
    layerwise("data", "synth", "--users", "200", "--items", "50", "--interactions", "3000",
              "--out", str(workdir / "synth"), cwd=workdir)
    assert (workdir / "synth" / "synthetic.inter").is_file()
    layerwise("data", "stats", "--dataset", str(workdir / "synth"), "--json", str(workdir / "stats.json"),
              cwd=workdir)
    stats = json.loads((workdir / "stats.json").read_text())
    assert stats["users"] == 200 and stats["interactions"] == 3000


def test_train_evaluate_beats_mostpop(teacher, workdir):
    for model in (str(teacher), "mostpop"):
        name = Path(model).name
        layerwise("evaluate", "--model", model, "--dataset", DATASET, "--max-len", "20",
                  "--json", str(workdir / f"{name}.json"), cwd=workdir)
    trained = json.loads((workdir / "teacher.json").read_text())
    mostpop = json.loads((workdir / "mostpop.json").read_text())
    assert trained["protocol"]["exclude_seen"] is True and trained["protocol"]["ranking"] == "full"
    for key in ("hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20", "mrr", "precision@5"):
        assert key in trained["means"]
    assert trained["means"]["ndcg@10"] > mostpop["means"]["ndcg@10"]


def test_score_compress_bench(teacher, workdir):
    layerwise("score", "--model", str(teacher), "--dataset", DATASET, "--calib-batches", "2",
              "--calib-batch-size", "16", "--json", str(workdir / "scores.json"), cwd=workdir)
    scores = json.loads((workdir / "scores.json").read_text())
    assert scores["n_layers"] == 2 and len(scores["scores"]["fisher"]) == 2
    assert {"fisher", "taylor", "block_influence", "ablation"} <= set(scores["scores"])
    layerwise("compress", "--teacher", str(teacher), "--dataset", DATASET, "--keep", "0.5",
              "--selector", "topk", "--bridge-rank", "4", "--heal-epochs", "1", "--cache-teacher",
              "--out", str(workdir / "compact"), cwd=workdir)
    manifest = json.loads((workdir / "compact" / "manifest.json").read_text())
    assert manifest["kind"] == "compact" and len(manifest["kept"]) == 1 and manifest["n_layers"] == 1
    assert manifest["heal"]["config"]["cache_teacher"] is True
    out = layerwise("bench", "--models", str(teacher), str(workdir / "compact"), "--runs", "3", "--warmup", "1",
                    "--batch-sizes", "1", "4", "--json", str(workdir / "bench.json"), cwd=workdir).stdout
    bench = json.loads((workdir / "bench.json").read_text())
    names = list(bench["models"])
    assert bench["models"][names[1]]["n_layers"] == 1 and bench["models"][names[0]]["n_layers"] == 2
    assert bench["models"][names[1]]["batches"]["4"]["speedup"] > 0
    # The guard's verdict is in the JSON and on the screen: each disturbed figure named, or none.
    disturbed = [b for b, e in bench["models"][names[1]]["batches"].items() if e["status"] == "disturbed"]
    assert bench["guard"]["disturbed"] == disturbed and bench["guard"]["attempts"][0]["rounds"] == 3
    assert "Rounds per attempt: 3" in out and out.count("DISTURBED, not a result") == len(disturbed)


def test_compress_with_its_defaults(teacher, workdir):
    """The default path: no selector named, so a 2-layer teacher gets beam over the loss dependency matrix."""
    out = layerwise("compress", "--teacher", str(teacher), "--dataset", DATASET, "--keep", "0.5",
                    "--heal-epochs", "2", "--out", str(workdir / "compact-default"), cwd=workdir).stdout
    assert "keep 1 of 2 layers, selector beam (the default at this depth)" in out
    manifest = json.loads((workdir / "compact-default" / "manifest.json").read_text())
    assert manifest["selector"] == "beam" and manifest["method"] == "ablation_loss"
    assert len(manifest["importance"]["dependency"]) == 2 and manifest["n_layers"] == 1
    assert manifest["bridge_rank"] == 0 and manifest["heal"]["config"]["epochs"] == 2
    assert 0 < manifest["valid"]["ndcg@10"] <= 1


def test_bad_inputs_give_clear_errors(teacher, workdir):
    out = layerwise("evaluate", "--model", str(workdir / "nope"), "--dataset", DATASET, cwd=workdir,
                    check=False)
    assert out.returncode == 2 and "neither a model directory nor a baseline" in out.stderr
    out = layerwise("evaluate", "--model", str(teacher), "--dataset", "synthetic:200:50:3000:0",
                    cwd=workdir, check=False)
    assert out.returncode == 2 and "items" in out.stderr
    out = layerwise("compress", "--teacher", str(teacher), "--dataset", DATASET, "--keep", "5",
                    "--out", str(workdir / "bad"), cwd=workdir, check=False)
    assert out.returncode == 2 and "cannot keep" in out.stderr
    out = layerwise("data", "stats", "--dataset", str(workdir / "missing.csv"), cwd=workdir, check=False)
    assert out.returncode == 2 and "missing.csv" in out.stderr


def test_train_a_causal_bert_and_refuse_a_causal_t5(workdir):
    out_dir = workdir / "causal-bert"
    layerwise("train", "--dataset", DATASET, "--cache-dir", str(workdir / "cache"), "--family", "bert",
              "--preset", "tiny", "--causal", "--epochs", "1", "--max-len", "20", "--out", str(out_dir), cwd=workdir)
    config = json.loads((out_dir / "backbone" / "config.json").read_text())
    assert config["model_type"] == "bert" and config["is_decoder"] is True
    out = layerwise("train", "--dataset", DATASET, "--cache-dir", str(workdir / "cache"), "--family", "t5",
                    "--preset", "tiny", "--causal", "--epochs", "1", "--out", str(workdir / "t5"), cwd=workdir,
                    check=False)
    assert out.returncode == 2 and "T5's encoder has no causal mode" in out.stderr
