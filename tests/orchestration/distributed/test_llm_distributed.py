"""Ray Train + DeepSpeed (ZeRO-2, 2 gloo workers on CPU) heals the compact model of the SmolLM2 recommender
(3 real layers, the cosine head, 8-item windows) with LoRA, merged into a stock backbone at the end.
Sharding importance over Ray tasks is tested on every family in test_shards.py."""

from __future__ import annotations

import pytest
from transformers import AutoModel

from layerwise.compression.compact import load_compact
from layerwise.compression.distill import HealConfig
from layerwise.evaluation.evaluate import evaluate
from layerwise.models.checkpoint import save_recommender
from layerwise.models.factory import build_recommender
from layerwise.models.llm import LLMSetup
from orchestration.distributed.specs import DataSpec
from orchestration.distributed.training import heal_distributed

pytestmark = pytest.mark.slow  # whole file: it runs early under pytest-xdist (tests/conftest.py)

DATA = "synthetic:60:40:600:0"  # 40 items with titles and genres
SHORT = 8  # window length: the real layers at a tiny cost


@pytest.fixture(scope="module")
def data_spec(tmp_path_factory):
    return DataSpec(DATA, cache_dir=str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def teacher_dir(smollm2, data_spec, tmp_path_factory):
    """A 3-layer SmolLM2 teacher with the cosine head, saved as training leaves it (LoRA merged)."""
    data = data_spec.load()
    setup = LLMSetup(n_layers=3, item_init="title_tokens", item_scale="row_norm", lora_rank=4)
    model = build_recommender(data, "llama", pretrained=str(smollm2.path), dropout=0.0, head="cos", llm=setup)
    path = tmp_path_factory.mktemp("llm") / "teacher"
    save_recommender(model.eval(), path, {"kind": "teacher", "data_fingerprint": data.fingerprint})
    return path


def test_ray_train_deepspeed_heals_the_llm_compact_model(ray_local, teacher_dir, data_spec, tmp_path):
    config = HealConfig(epochs=1, batch_size=16, lr=1e-3, trainable="lora", lora_rank=4, prefit_steps=0,
                        max_len=SHORT, seed=0)
    run = heal_distributed(data_spec, str(teacher_dir), keep=[0, 2], bridge_rank=0, heal_config=config,
                           num_workers=2, zero_stage=2, storage_path=str(tmp_path / "ray"), name="heal",
                           out_dir=str(tmp_path / "compact"))
    assert (run["world_size"], run["zero_stage"]) == (2, 2) and [r["epoch"] for r in run["history"]] == [0, 1]
    compact = load_compact(tmp_path / "compact")
    assert compact.kept == [0, 2] and compact.n_layers == 2 and compact.head_kind == "cos"
    backbone = AutoModel.from_pretrained(tmp_path / "compact" / "backbone")  # LoRA merged: stock weights
    assert len(backbone.layers) == 2 and not any("lora" in k for k in backbone.state_dict())
    # The saved model is the best epoch's, and scores what rank 0 measured before saving it.
    valid = evaluate(compact.eval().score, data_spec.load(), stage="valid", max_len=SHORT).means["ndcg@10"]
    assert valid == pytest.approx(run["best"]["valid_ndcg@10"], abs=1e-6)
    assert run["best"]["valid_ndcg@10"] == pytest.approx(max(r["valid_ndcg@10"] for r in run["history"]))
    with pytest.raises(ValueError, match="autocast is not wired"):
        heal_distributed(data_spec, str(teacher_dir), keep=[0, 2], bridge_rank=0,
                         heal_config=HealConfig(autocast="bf16"), storage_path=str(tmp_path / "ray"))
