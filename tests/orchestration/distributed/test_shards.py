"""Sharded importance on a real local Ray: equal to the single-process result, and retried on worker death."""

import functools
import json
import os
import subprocess
import sys

import pytest
import ray
import torch

from layerwise.compression.bridges import set_bridges
from layerwise.compression.dependency import dependency_matrix
from layerwise.compression.importance import LOCAL_METHODS, ablation, compute_importance
from orchestration.distributed.ray_runtime import cpu_fraction, init_ray, ray_session
from orchestration.distributed.shards import (
    build_model, build_shard, every_score, model_weights, put_model, remote_ablation, shard_weights,
    sharded_importance, split_shards, submit_ablation, submit_dependency,
)
from tests.helpers.tiny_models import calibration_batches, cyclic_data, tiny_model

pytestmark = pytest.mark.slow  # whole file: it runs early under pytest-xdist (tests/conftest.py)


def _rel_err(a, b):
    return ((a - b).abs() / b.abs().clamp(min=1e-30)).max().item()


@functools.lru_cache(maxsize=None)
def _case(family):
    """A 4-layer tiny model, its calibration batches and the single-process scores (computed once)."""
    model = tiny_model(family, n_layers=4)
    batches = calibration_batches(model, cyclic_data(n_users=12), batch_size=6, n_batches=2)
    return model, batches, compute_importance(model, batches)


def test_split_shards_is_contiguous_and_balanced():
    assert split_shards(4, 1) == [(0, 4)]
    assert split_shards(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert split_shards(5, 2) == [(0, 3), (3, 5)]
    shards = split_shards(11, 3)
    assert shards == [(0, 4), (4, 8), (8, 11)]
    for n_shards in (0, 5):
        with pytest.raises(ValueError, match="n_shards"):
            split_shards(4, n_shards)


def test_cpu_fraction_lets_tasks_share_small_machines():
    assert cpu_fraction(1) == 0.25
    assert cpu_fraction(2) == 0.5
    assert cpu_fraction(3) == 0.75
    assert cpu_fraction(64) == 1.0


def test_shard_weights_hold_only_their_layers():
    model, _, _ = _case("t5")
    weights = shard_weights(model, 2, 4)
    expected = {f"{j}.{k}": v for j, l in enumerate((2, 3)) for k, v in model.layers[l].state_dict().items()}
    assert weights["state"].keys() == expected.keys()
    assert not any("relative_attention_bias" in k for k in weights["state"])  # block 0 owns the table
    assert any("relative_attention_bias" in k for k in shard_weights(model, 0, 1)["state"])
    layers = build_shard(weights)
    assert len(layers) == 2
    for name, value in layers.state_dict().items():
        assert not value.is_meta, name
        assert torch.equal(value, expected[name]), name


def test_model_weights_rebuild_the_same_model():
    model, _, _ = _case("llama")
    rebuilt = build_model(model_weights(model))
    histories = cyclic_data(n_users=6).padded_histories(range(6), "valid", 12)
    with torch.no_grad():
        assert torch.equal(rebuilt.score(histories), model.eval().score(histories))
    # An LLM teacher's input norm and cosine head travel too (a rebuild without them scored differently).
    llm_like = tiny_model("llama", n_layers=2, head="cos").eval()
    llm_like.input_norm = 1.5
    with torch.no_grad():
        llm_like.log_temperature.fill_(0.7)
    again = build_model(model_weights(llm_like))
    assert again.head_kind == "cos" and again.input_norm == 1.5
    with torch.no_grad():
        assert torch.equal(again.score(histories), llm_like.score(histories))
    bridged = tiny_model("llama", n_layers=2)
    set_bridges(bridged, [1], 2)
    with pytest.raises(ValueError, match="bridges"):
        model_weights(bridged)


def test_init_ray_is_idempotent_and_sessions_keep_an_outer_ray(ray_local):
    assert ray_local["CPU"] == 2.0
    assert ray_local["object_store_memory"] == pytest.approx(150 * 2**20, rel=0.01)
    assert init_ray(num_cpus=1)["CPU"] == 2.0  # already connected: nothing restarts
    with ray_session(num_cpus=1) as resources:
        assert resources["CPU"] == 2.0
    assert ray.is_initialized()  # the session did not start Ray, so it did not stop it
    assert cpu_fraction() == 0.5


_JOIN = """
import json, sys, ray
from orchestration.distributed.ray_runtime import init_ray, ray_session
with ray_session(address=sys.argv[1]) as first:  # the address argument
    nodes = [ray.get_runtime_context().get_node_id()]
print(json.dumps({"after_session": ray.is_initialized(), "cpu": first["CPU"]}))
init_ray()  # RAY_ADDRESS from the environment
nodes.append(ray.get_runtime_context().get_node_id())
print(json.dumps({"nodes": nodes}))
"""


def test_address_and_ray_address_join_the_running_cluster(ray_local):
    address = ray.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_ADDRESS": address, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", _JOIN, address], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    session, joined = (json.loads(line) for line in out.stdout.strip().splitlines()[-2:])
    assert session == {"after_session": False, "cpu": 2.0}
    # Both joins reached this test's own node: neither started a private Ray.
    assert joined["nodes"] == [ray.get_runtime_context().get_node_id()] * 2
    assert ray.cluster_resources()["CPU"] == 2.0  # the joiners' disconnects left the cluster running


@pytest.mark.parametrize("family", ["llama", "t5"])
@pytest.mark.parametrize("n_shards", [1, 2, 4])
def test_sharded_equals_single_process(ray_local, family, n_shards):
    model, batches, single = _case(family)
    sharded = sharded_importance(model, batches, n_shards)
    assert sorted(sharded) == sorted(LOCAL_METHODS)
    for method in LOCAL_METHODS:
        assert sharded[method].shape == (4,)
        assert (single[method] > 0).all(), method
        assert _rel_err(sharded[method], single[method]) < 1e-5, method


def test_subset_of_methods_without_gradients(ray_local):
    model, batches, single = _case("t5")
    sharded = sharded_importance(model, batches, 2, methods=("angular", "activation"))
    assert sorted(sharded) == ["activation", "angular"]
    assert _rel_err(sharded["angular"], single["angular"]) < 1e-5
    with pytest.raises(ValueError, match="unknown local methods"):
        sharded_importance(model, batches, 2, methods=("ablation",))


def test_killed_shard_worker_is_retried_with_identical_scores(ray_local, tmp_path):
    model, batches, _ = _case("llama")
    clean = sharded_importance(model, batches, 2)
    marker = tmp_path / "crashed"
    retried = sharded_importance(model, batches, 2, _crash_marker=str(marker))
    # The marker holds the pid of the worker that ran the first attempt and then called os._exit(1).
    assert marker.exists() and int(marker.read_text()) != os.getpid()
    for method in LOCAL_METHODS:
        assert torch.equal(retried[method], clean[method]), method


def test_remote_ablation_and_dependency_equal_local(ray_local):
    model = tiny_model("llama", n_layers=3)
    data = cyclic_data(n_users=30)
    batches = calibration_batches(model, data, batch_size=8, n_batches=2)
    ref = put_model(model)  # weights in the object store once, shared by the three tasks
    pending = {
        "loss": submit_ablation(ref, batches, None, "loss"),
        "ndcg": submit_ablation(ref, batches, data, "ndcg@10", max_users=20, seed=1),
        "dependency": submit_dependency(ref, batches, None, "loss"),
    }
    expected = {  # computed here while the tasks run
        "loss": ablation(model, batches, metric="loss"),
        "ndcg": ablation(model, batches, data, metric="ndcg@10", max_users=20, seed=1),
        "dependency": dependency_matrix(model, batches),
    }
    got = dict(zip(pending, ray.get(list(pending.values()))))
    # A random model: removing a layer may help or hurt, but never leaves the loss exactly unchanged.
    assert (expected["loss"] != 0).all() and expected["dependency"].abs().sum() > 0
    for name in pending:
        assert got[name].shape == expected[name].shape, name
        assert torch.allclose(got[name], expected[name], rtol=1e-6, atol=1e-9), name
    # The plain model (not a ref) works too: put once inside the call.
    assert torch.allclose(remote_ablation(model, batches, None, "loss"), expected["loss"], rtol=1e-6, atol=1e-9)


def test_every_score_at_once_equals_each_computed_alone(ray_local):
    model = tiny_model("llama", n_layers=3)
    data = cyclic_data(n_users=30)
    batches = calibration_batches(model, data, batch_size=8, n_batches=2)
    scores, dependency = every_score(model, batches, data, n_shards=2)
    expected = {**compute_importance(model, batches), "ablation_loss": ablation(model, batches, data, metric="loss"),
                "ablation": ablation(model, batches, data, metric="ndcg@10")}
    assert sorted(scores) == sorted(expected) == sorted([*LOCAL_METHODS, "ablation", "ablation_loss"])
    for name, value in expected.items():
        assert torch.allclose(scores[name], value, rtol=1e-5, atol=1e-9), name
    assert torch.allclose(dependency, dependency_matrix(model, batches, data=data), rtol=1e-6, atol=1e-9)

    # Only what is asked for: topk on block influence needs neither ablation nor the dependency matrix.
    local, none = every_score(model, batches, data, n_shards=2, evaluations=())
    assert sorted(local) == sorted(LOCAL_METHODS) and none is None
    with pytest.raises(ValueError, match="unknown evaluations"):
        every_score(model, batches, data, n_shards=2, evaluations=("fisher",))


def test_sharded_forward_estimators_on_a_text_stack_report_worker_memory(ray_local):
    from layerwise.models import build_backbone, preset_config
    from layerwise.models.token_stack import TEXT_METHODS, TokenStack

    torch.manual_seed(0)
    config = preset_config("qwen2", "tiny", n_layers=4, dropout=0.0, vocab_size=40, pad_token_id=None)
    stack = TokenStack(build_backbone(config).eval())
    inputs = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]])  # token ids + 1, right-padded with 0
    batches = [(inputs, inputs)]
    memory = []
    sharded = sharded_importance(stack, batches, 2, methods=TEXT_METHODS, worker_memory=memory)
    single = compute_importance(stack, batches, TEXT_METHODS)
    for method in TEXT_METHODS:
        assert _rel_err(sharded[method], single[method]) < 1e-6, method
    assert len(memory) == 2
    assert all(m["peak_rss"] >= m["rss"] > 0 for m in memory)
    # fresh workers: each shard in a newly started process, never one of the idle workers the call above
    # left, so a worker's peak memory is its shard's alone
    fresh = []
    again = sharded_importance(stack, batches, 2, methods=TEXT_METHODS, worker_memory=fresh, fresh_workers=True)
    assert all(torch.equal(again[m], sharded[m]) for m in TEXT_METHODS)
    pids = {m["pid"] for m in fresh}
    assert len(pids) == 2 and not pids & {m["pid"] for m in memory}
