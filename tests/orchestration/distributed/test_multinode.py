"""A real multi-node Ray cluster on this machine: sharded importance and Ray Train healing across worker
nodes, then the same run again while a worker node is lost mid-task, with identical results.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/orchestration/test_multinode.py

The cluster is `ray.cluster_utils.Cluster`: a head node and two worker nodes, each its own raylet and
object store, joined through the head's GCS exactly as `ray start --address` nodes are. The head offers
no CPU (as `ray start --head --num-cpus=0` on a real cluster): the driver and Ray Train's controller (a
0-CPU actor) live there, and every shard task and Train worker has to run on a worker node, with no
placement option in the code under test. Each worker node has 1 CPU and healing asks 1 CPU per Train
worker, so its two DeepSpeed ranks sit on two different nodes and talk gloo across them.

The node loss: a watcher thread polls the worker nodes' processes for the title `ray::_shard_task`
(Ray renames a worker process to its task while the task runs). The first one it sees is frozen with
SIGSTOP, so its task can never finish or send its result, and then its whole node is removed (raylet,
agents, workers killed). The driver must see the task fail, retry it (`max_retries`) on the surviving
node, and return scores equal to the intact run's. Healing then needs two 1-CPU nodes again, so a
replacement node joins first, as an autoscaler would add one. 1.5 min on 2 idle cores, 2.5 at load 6.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from layerwise.compression.compact import load_compact
from layerwise.compression.compress import calibration_batches
from layerwise.compression.distill import HealConfig
from layerwise.compression.importance import LOCAL_METHODS, compute_importance
from layerwise.models.checkpoint import save_recommender
from layerwise.training.train import TrainConfig, train_recommender
from orchestration.distributed.shards import sharded_importance
from orchestration.distributed.specs import DataSpec, ModelSpec, build_model
from orchestration.distributed.training import heal_distributed

pytestmark = pytest.mark.slow

# 1000 users give ~1,100 training windows: 16 calibration batches of 64 make each shard task run for a
# few tenths of a second, long enough for the watcher (polling every few ms) to catch one mid-task.
DATA = "synthetic:1000:200:20000:0"
MODEL = ModelSpec("llama", "tiny", n_layers=4, max_len=50, dropout=0.0, seed=0)
CALIB_BATCHES, CALIB_SIZE = 16, 64
HEAL = HealConfig(epochs=1, batch_size=64, lr=3e-3, trainable="all", prefit_steps=10, max_len=50, seed=0)
# With bridges: `build_compact` seeds their initialisation from the heal seed, so runs on different nodes
# (each with its own global RNG) build the same student.
KEEP, BRIDGE_RANK = [0, 3], 4
STORE = 100 * 2**20  # per node; Ray's minimum is 75 MiB and the tensors that travel are a few MB
TOLERANCE = 1e-6
TASK_TITLE = "ray::_shard_task"  # orchestration.distributed.shards._shard_task while it runs
# A killed raylet is declared dead after period x threshold (default 3 s x 5); 1.5 s keeps the retry quick.
FAST_DEATH = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}


def _add_worker(cluster: Cluster):
    return cluster.add_node(num_cpus=1, object_store_memory=STORE)


@pytest.fixture(scope="module")
def cluster():
    """Head (0 CPU) + two 1-CPU worker nodes, the driver connected; everything stopped afterwards.

    `Cluster.shutdown` stops only this cluster's processes (never `ray stop`: that kills every Ray on the
    machine, other people's included). RAY_ADDRESS is hidden so nothing joins a foreign cluster.
    """
    saved = os.environ.pop("RAY_ADDRESS", None)
    if ray.is_initialized():
        ray.shutdown()  # a session another module leaked; this test needs the driver on its own cluster
    head = {"num_cpus": 0, "object_store_memory": STORE, "include_dashboard": False,
            "_system_config": FAST_DEATH}
    nodes = None
    try:
        nodes = Cluster(initialize_head=True, head_node_args=head)
        for _ in range(2):
            _add_worker(nodes)
        nodes.wait_for_nodes()
        ray.init(address=nodes.address, logging_level="WARNING", log_to_driver=False)
        yield nodes
    finally:
        ray.shutdown()
        if nodes is not None:
            nodes.shutdown()
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The data spec, a briefly trained 4-layer teacher saved to disk, its calibration batches, and the
    single-process importance scores of those batches."""
    root = tmp_path_factory.mktemp("multinode")
    spec = DataSpec(DATA, cache_dir=str(root / "cache"))
    data = spec.load()
    teacher = build_model(MODEL, data)
    train_recommender(teacher, data, TrainConfig(epochs=2, batch_size=128, lr=3e-3, eval_every=2, seed=0),
                      progress=False)
    teacher.eval()
    teacher_dir = save_recommender(teacher, root / "teacher", {"kind": "teacher", "dataset": DATA,
                                                                 "data_fingerprint": data.fingerprint})
    batches = calibration_batches(teacher, data, CALIB_BATCHES, CALIB_SIZE, MODEL.max_len, seed=0)
    assert len(batches) == CALIB_BATCHES  # else the shard tasks would be too short to catch
    return {"root": root, "spec": spec, "teacher": teacher, "teacher_dir": str(teacher_dir),
            "batches": batches, "single": compute_importance(teacher, batches)}


def _heal(case: dict, name: str) -> dict:
    storage = case["root"] / "ray_train"
    return heal_distributed(case["spec"], case["teacher_dir"], KEEP, BRIDGE_RANK, HEAL, num_workers=2,
                            zero_stage=2, storage_path=str(storage), cpus_per_worker=1.0, name=name,
                            out_dir=str(storage / f"{name}-model"))


@pytest.fixture(scope="module")
def intact(cluster, case):
    """Sharded importance (2 shards) and one healing run on the whole cluster."""
    nodes = _alive_nodes()
    scores = sharded_importance(case["teacher"], case["batches"], n_shards=2)
    return {"nodes": nodes, "scores": scores, "heal": _heal(case, "heal-intact")}


@pytest.fixture(scope="module")
def degraded(intact, cluster, case):
    """The same run, losing a worker node while a shard task runs on it; a replacement joins for healing."""
    watcher = _LoseNodeMidTask(cluster)
    watcher.start()
    try:
        scores = sharded_importance(case["teacher"], case["batches"], n_shards=2)
    finally:
        watcher.stop.set()
        watcher.join(timeout=60)
    if watcher.error is not None:
        raise watcher.error
    after_loss = _alive_after_loss((watcher.caught or {}).get("node_id"))
    _add_worker(cluster)
    cluster.wait_for_nodes()
    return {"scores": scores, "caught": watcher.caught, "after_loss": after_loss,
            "heal": _heal(case, "heal-degraded"), "nodes": _alive_nodes()}


def _alive_after_loss(lost: str | None, timeout_s: float = 60.0) -> dict[str, float]:
    """The live set once the GCS has noticed the loss. The raylet retries the task first; the GCS marks the
    node dead only after its health checks fail, which can be after the retried task is done. A node that
    is still alive after `timeout_s` stays in the set and fails the test."""
    deadline = time.time() + timeout_s
    alive = _alive_nodes()
    while lost in alive and time.time() < deadline:
        time.sleep(0.5)
        alive = _alive_nodes()
    return alive


def _alive_nodes() -> dict[str, float]:
    """node id -> CPUs, for the nodes the GCS counts alive."""
    return {n["NodeID"]: n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]}


class _LoseNodeMidTask(threading.Thread):
    """Remove the first worker node seen running a shard task, while the task runs.

    `caught` afterwards: {"node_id", "pid", "title" (read while the process was frozen), "killed" (pids)}.
    """

    def __init__(self, cluster: Cluster, poll_s: float = 0.003):
        super().__init__(daemon=True)
        self.cluster, self.poll_s = cluster, poll_s
        self.stop = threading.Event()
        self.caught: dict | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set() and self.caught is None:
                for node in list(self.cluster.worker_nodes):
                    if self._try_lose(node):
                        return
                time.sleep(self.poll_s)
        except BaseException as error:  # re-raised by the fixture in the main thread
            self.error = error

    def _try_lose(self, node) -> bool:
        raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
        for worker in raylet.children():
            try:
                if not _title(worker).startswith(TASK_TITLE):
                    continue
                # Frozen, the task can neither finish nor send its result to the driver (the reply goes
                # worker -> driver directly, not through the raylet), so only a retry can produce it.
                worker.send_signal(signal.SIGSTOP)
                title = _title(worker)
                if not title.startswith(TASK_TITLE):  # finished between the two reads: let it go
                    worker.send_signal(signal.SIGCONT)
                    continue
            except psutil.NoSuchProcess:
                continue
            self._remove(node, worker.pid, title)
            return True
        return False

    def _remove(self, node, pid: int, title: str) -> None:
        # Everything this node's raylet started dies with the node, as on a machine that goes away;
        # the frozen worker cannot notice its raylet is gone, so it is killed by pid, with its siblings.
        node_pids = [p.pid for p in psutil.Process(node.all_processes["raylet"][0].process.pid)
                     .children(recursive=True)]
        try:
            self.cluster.remove_node(node, allow_graceful=False)
        finally:  # even if the removal failed: a frozen worker must never outlive the test
            for child in node_pids:
                try:
                    psutil.Process(child).kill()
                except psutil.NoSuchProcess:
                    pass
        self.caught = {"node_id": node.node_id, "pid": pid, "title": title.strip(), "killed": node_pids}


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE  # an unreaped orphan is dead too
    except psutil.NoSuchProcess:
        return False


def _title(process: psutil.Process) -> str:
    return " ".join(process.cmdline())


def _assert_close(got: dict, expected: dict) -> None:
    for method in LOCAL_METHODS:
        rel = ((got[method] - expected[method]).abs() / expected[method].abs().clamp(min=1e-30)).max().item()
        assert rel <= TOLERANCE, (method, rel)


# --- the tests -------------------------------------------------------------------------------------
def test_cluster_is_a_cpu_less_head_and_two_worker_nodes(intact):
    cpus = sorted(intact["nodes"].values())
    assert cpus == [0.0, 1.0, 1.0], intact["nodes"]
    assert intact["nodes"][ray.get_runtime_context().get_node_id()] == 0.0  # the driver sits on the head


def test_sharded_importance_across_nodes_equals_single_process(intact, case):
    assert sorted(intact["scores"]) == sorted(LOCAL_METHODS)
    for method in LOCAL_METHODS:
        assert intact["scores"][method].shape == (MODEL.n_layers,)
        assert (case["single"][method] > 0).all(), method  # a real signal, not zeros equal to zeros
    _assert_close(intact["scores"], case["single"])


def test_healing_spans_two_nodes_and_saves_a_compact_model(intact, case):
    heal = intact["heal"]
    assert heal["world_size"] == 2 and heal["zero_stage"] == 2
    # 1 CPU per rank and two 1-CPU worker nodes: each rank had a node of its own.
    assert sorted(intact["nodes"].values()).count(1.0) == 2
    assert [r["epoch"] for r in heal["history"]] == [0, 1]  # before healing, then the one epoch
    assert heal["best"]["valid_ndcg@10"] >= heal["history"][0]["valid_ndcg@10"]
    student = load_compact(heal["model_dir"])
    assert student.n_layers == len(KEEP) and student.kept == KEEP
    assert len(student.bridges) == (1 if BRIDGE_RANK else 0)


def test_lost_node_mid_task_is_retried_with_identical_scores(degraded, intact, case):
    caught = degraded["caught"]
    assert caught is not None, "no shard task was seen running on a worker node: nothing was lost"
    assert caught["title"].startswith(TASK_TITLE) and caught["pid"] in caught["killed"]
    assert not _running(caught["pid"])  # the frozen first attempt died unfinished: a retry gave the scores
    # The lost node is gone from the GCS's live set: one 1-CPU worker node was left to run the retry.
    assert caught["node_id"] in intact["nodes"] and caught["node_id"] not in degraded["after_loss"]
    assert sorted(degraded["after_loss"].values()) == [0.0, 1.0]
    _assert_close(degraded["scores"], intact["scores"])
    _assert_close(degraded["scores"], case["single"])


def test_healing_after_node_loss_and_replacement_is_identical(degraded, intact):
    assert sorted(degraded["nodes"].values()) == [0.0, 1.0, 1.0]
    assert set(degraded["nodes"]) != set(intact["nodes"])  # a new worker node, not the lost one back
    before, after = intact["heal"], degraded["heal"]
    assert after["world_size"] == 2
    assert len(after["history"]) == len(before["history"])
    for a, b in zip(after["history"], before["history"]):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=TOLERANCE, abs=TOLERANCE), key
    healed = {k: v for k, v in load_compact(after["model_dir"]).state_dict().items()}
    reference = load_compact(before["model_dir"]).state_dict()
    assert healed.keys() == reference.keys()
    for name, value in reference.items():
        assert torch.allclose(healed[name], value, rtol=TOLERANCE, atol=TOLERANCE), name
