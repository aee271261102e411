"""`layerwise plan`: counts, ZeRO memory per stage, shard split and the DeepSpeed config it picks."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from layerwise.compression.compact import removed_parameters
from layerwise.models.scale import meta_recommender, numel
from orchestration.scale.plan import (
    GIB,
    USABLE,
    LayerDims,
    analytic_model_states,
    deepspeed_section,
    model_states,
    plan,
    plan_main,
    shard_split,
    training_activations,
)


@pytest.fixture(scope="module")
def llama13():
    return plan("llama", "13b", keep=0.25, gpus=8)


def test_compact_count_is_full_minus_removed_layers_plus_bridges(llama13):
    p, m = llama13["parameters"], llama13["model"]
    teacher = meta_recommender("llama", "13b", 10_000)
    assert p["full"] == numel(teacher)
    assert m["k"] == 10 and len(m["kept"]) == 10 and m["kept"][-1] == 39  # uniform keeps the last layer
    assert p["compact"] == p["full"] - removed_parameters(teacher, m["kept"]) + p["bridges"]
    # A bridge of rank 16 at hidden 5120: LayerNorm (2h) + down (16h + 16) + up (16h + h).
    assert p["bridges"] == len(m["bridge_slots"]) * (2 * 5120 + 16 * 5120 + 16 + 16 * 5120 + 5120)


def test_analytic_model_states_follow_the_zero_paper():
    params, n = 1_000_000, 8
    assert analytic_model_states(params, 0, n) == 16 * params
    assert analytic_model_states(params, 1, n) == 4 * params + 12 * params // n
    assert analytic_model_states(params, 2, n) == 2 * params + 14 * params // n
    assert analytic_model_states(params, 3, n) == 16 * params // n


def test_deepspeed_estimators_are_used_for_stages_2_and_3():
    params, largest, n = 8_000_000, 300_000, 4
    zero2, zero3 = model_states(params, 2, n, largest), model_states(params, 3, n, largest)
    assert "estimate_zero2" in zero2["source"] and zero2["bytes"] == 2 * params + 18 * params // n
    assert "estimate_zero3" in zero3["source"] and zero3["bytes"] == 4 * largest + 18 * params // n
    assert model_states(params, 1, n, largest)["source"] == "analytic (ZeRO paper)"


def test_training_activations_by_hand():
    dims = LayerDims(hidden=8, q=8, kv=4, ffn=16, gated=True)
    assert dims.values_per_token() == 4 * 8 + 2 * 8 + 2 * 4 + 4 * 16
    tokens, n_items, layers = 6, 9, 3
    head = 2 * 4 * tokens * (n_items + 1) + 2 * tokens * 3 * 8
    assert training_activations(dims, layers, tokens, n_items) == 2 * tokens * 120 * layers + head
    checkpointed = training_activations(dims, layers, tokens, n_items, checkpointed=True)
    assert checkpointed == 2 * tokens * 8 * layers + 2 * tokens * 120 + head


def test_llama13_needs_zero_beyond_stage_0_on_8_gpus(llama13):
    rows = {r["stage"]: r for r in llama13["training"]}
    assert not rows[0]["fits"] and rows[3]["fits"]  # 16 B x 12.7B params = 190 GiB on every GPU at stage 0
    totals = [rows[s]["total_gib"] for s in range(4)]
    assert totals == sorted(totals, reverse=True)
    heal = llama13["healing"]
    assert all(r["teacher_gib"] * GIB >= 2 * llama13["parameters"]["full"] for r in heal)
    assert llama13["lowest_fitting_stage"]["training"] == next(s for s in range(4) if rows[s]["fits"])


def test_shard_split_is_the_fewest_contiguous_shards_that_fit(llama13):
    shards = llama13["importance_shards"]
    assert shards["n_shards"] == 2 and shards["fits"]  # 40 layers x 2.5 GiB (fp32 weights + grads) > 72 GiB
    assert shards["ranges"][0][0] == 0 and shards["ranges"][-1][1] == 40
    assert all(a[1] == b[0] for a, b in zip(shards["ranges"], shards["ranges"][1:]))
    assert shards["per_shard_gib"] <= USABLE * 80
    dims = LayerDims(5120, 5120, 5120, 13824, True)
    layer = 317_204_480
    smaller = shard_split(layer, 40, dims, 50, 24 * GIB)
    assert smaller["n_shards"] > shards["n_shards"] and smaller["fits"]
    hopeless = shard_split(layer, 40, dims, 50, 1 * GIB)
    assert hopeless["n_shards"] == 40 and not hopeless["fits"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
def test_cpu_plan_never_returns_gpu_deepspeed_settings(llama13):
    for section in (llama13["deepspeed"], deepspeed_section(3, 4)):
        config = section["config"]
        assert section["device"] == "cpu"
        assert "bf16" not in config and "fp16" not in config
        zero = config["zero_optimization"]
        assert not [k for k in zero if k.startswith("stage3_") or k.startswith("offload") or k == "overlap_comm"]
        assert config["optimizer"]["params"]["torch_adam"] is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_plan_uses_bf16_zero3():
    section = deepspeed_section(3, 4)
    assert section["device"] == "cuda" and section["config"]["zero_optimization"]["stage"] == 3
    assert "stage3_prefetch_bucket_size" in section["config"]["zero_optimization"]
    assert section["config"]["bf16"]["enabled"] == torch.cuda.is_bf16_supported()


def test_plan_main_prints_and_writes_json(tmp_path, capsys):
    args = argparse.Namespace(family="bert", size="base", keep=0.5, gpus=1, n_items=500, seq_len=20,
                              micro_batch=4, gpu_gb=16.0, bridge_rank=0, stage=2, json=str(tmp_path / "p.json"))
    assert plan_main(args) == 0
    printed = capsys.readouterr().out
    written = json.loads((tmp_path / "p.json").read_text())
    assert written["model"]["k"] == 6 and written["parameters"]["bridges"] == 0
    assert written["deepspeed"]["stage"] == 2
    assert "bert-base-uncased" in printed and "Healing" in printed and "Sharded importance" in printed
    full, compact = written["inference"]["full"]["total"], written["inference"]["compact"]["total"]
    assert compact < full


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="gpus"):
        plan("bert", "base", gpus=0)
    with pytest.raises(ValueError, match="cannot keep"):
        plan("bert", "base", keep=13)


def test_forward_only_shard_memory_and_fp32_inference():
    from orchestration.scale.plan import LayerDims, inference_memory, shard_memory

    dims = LayerDims(hidden=8, q=8, kv=4, ffn=16, gated=True)
    per_token = dims.values_per_token()
    # weights + grads, every layer's activations, input states + output gradients of both batches
    assert shard_memory(100, 3, dims, tokens=10, batches=2) == 2 * 4 * 100 * 3 + 4 * 10 * per_token * 3 + 2 * 4 * 2 * 10 * 8
    # forward only: weights, one layer's transients, input states
    assert shard_memory(100, 3, dims, tokens=10, batches=2, gradients=False) == 4 * 100 * 3 + 4 * 10 * per_token + 4 * 2 * 10 * 8
    fp32 = inference_memory(100, dims, batch=2, seq=5, n_items=9, value_bytes=4)
    assert fp32["weights"] == 400 and fp32["total"] == 400 + 4 * 2 * 5 * (8 + per_token) + 4 * 2 * 10
    assert inference_memory(100, dims, 2, 5, 9)["weights"] == 200  # bf16 by default
    # a memory-mapped input table: only the rows a batch looks up are paged in (2 x 5 of 50 here)
    mapped = inference_memory(100 + 50 * 8, dims, 2, 5, 9, value_bytes=4, mapped_table_rows=50)
    assert mapped["weights"] == 4 * (100 + 10 * 8) and mapped["mapped_unread"] == 4 * 40 * 8


def test_a_local_config_plans_like_the_published_shape_it_describes(tmp_path):
    from layerwise.models.scale import scale_config

    scale_config("llama", "1b").to_json_file(tmp_path / "config.json")
    published = plan("llama", "1b", keep=0.25, gpus=2)
    for path in (tmp_path, tmp_path / "config.json"):  # the directory or the file
        local = plan(keep=0.25, gpus=2, shape=str(path))
        assert local["parameters"]["full"] == published["parameters"]["full"]
        assert local["parameters"]["compact"] == published["parameters"]["compact"]
        assert local["parameters"]["released"]["total"] == published["parameters"]["released"]["total"]
        assert local["training"] == published["training"] and local["inference"] == published["inference"]
        assert (local["model"]["family"], local["model"]["size"]) == ("llama", "custom")


def test_a_qwen2_config_plans_without_weights(tmp_path):
    from transformers import Qwen2Config

    Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=1000).to_json_file(tmp_path / "config.json")
    result = plan(keep=0.25, gpus=1, n_items=300, shape=str(tmp_path))
    assert result["model"]["family"] == "qwen2" and result["model"]["k"] == 2
    assert result["parameters"]["released"]["class"] == "Qwen2ForCausalLM"
    assert result["parameters"]["compact"] < result["parameters"]["full"]


def test_bad_local_configs_name_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model config"):
        plan(shape=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        plan(shape=str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a JSON config"):
        plan(shape=str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt_neox'"):
        plan(shape=str(tmp_path))
    with pytest.raises(ValueError, match="either a family and a size"):
        plan("llama", "1b", shape=str(tmp_path))
    with pytest.raises(ValueError, match="either a family and a size"):
        plan()


def test_plan_command_needs_a_shape_one_way(tmp_path):
    from orchestration.cli.main import main

    assert main(["plan", "--family", "llama"]) == 2
    assert main(["plan", "--family", "llama", "--size", "1b", "--config", str(tmp_path)]) == 2
