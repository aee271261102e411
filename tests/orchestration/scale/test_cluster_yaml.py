"""The shipped cluster.yaml validates offline; broken copies fail with a message naming the key."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from orchestration.scale.cluster_config import validate_cluster_yaml

SHIPPED = Path(__file__).resolve().parents[3] / "cluster.yaml"


@pytest.fixture(scope="module")
def shipped() -> dict:
    return yaml.safe_load(SHIPPED.read_text())


def test_shipped_cluster_yaml_validates():
    config = validate_cluster_yaml(SHIPPED)
    assert config["provider"]["type"] == "aws" and config["provider"]["region"]
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert workers and all(t["resources"]["GPU"] > 0 for t in workers)
    # prepare_config merged the common setup into the per-role lists the launcher actually runs.
    assert any("[orchestration]" in c for c in config["worker_setup_commands"])


def _without_install(config: dict) -> None:
    config["setup_commands"] = [c for c in config["setup_commands"] if "[orchestration]" not in c]


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def mutate(config: dict) -> None:
        target = config
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return mutate


MUTATIONS = {
    "missing head_node_type": (lambda c: c.pop("head_node_type"), "head_node_type is missing"),
    "unknown head node type": (_set("head_node_type", "gpu_head"), "head_node_type 'gpu_head' is not one of"),
    "negative max_workers": (_set("available_node_types", "gpu_worker", "max_workers", -1),
                             "available_node_types.gpu_worker.max_workers"),
    "worker without GPU": (_set("available_node_types", "gpu_worker", "resources", {"CPU": 48}),
                           "available_node_types.gpu_worker.resources.GPU"),
    "missing project install": (_without_install, "setup_commands do not install the project"),
    "worker max above the cluster's": (_set("max_workers", 1), "gpu_worker.max_workers (2) exceeds"),
    "missing region": (lambda c: c["provider"].pop("region"), "provider.region is missing"),
    "worker without node_config": (lambda c: c["available_node_types"]["gpu_worker"].pop("node_config"),
                                   "available_node_types.gpu_worker.node_config is missing"),
    # Passes our checks; only Ray's schema (additionalProperties: false) catches the typo.
    "misspelt top-level key": (_set("idle_timeout_minute", 5), "idle_timeout_minute"),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_broken_copies_fail_naming_the_key(name, shipped, tmp_path):
    mutate, expected = MUTATIONS[name]
    config = copy.deepcopy(shipped)
    mutate(config)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError) as err:
        validate_cluster_yaml(path)
    assert expected in str(err.value)


def test_install_must_come_from_the_mounted_repo(shipped, tmp_path):
    config = copy.deepcopy(shipped)
    config["file_mounts"] = {"~/data": "./data"}
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="the repository is not where it is installed from"):
        validate_cluster_yaml(path)
