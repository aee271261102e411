"""Search-space YAML -> checked entries -> ray.tune domains; every bad file names its key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.tune.search.sample import Categorical, Float, Integer, LogUniform, Quantized

from orchestration.search.space import PARAMETERS, load_space

SPACES = sorted(Path(__file__).resolve().parents[3].joinpath("tune_spaces").glob("*.yaml"))
assert len(SPACES) == 4, SPACES  # one file per family; an empty list would silently skip every check below
VALID = {
    "teacher": {"family": "llama", "preset": "tiny", "dataset": "synthetic:300:60:6000:0", "lr": 3.0e-3},
    "protocol": {"bench_runs": 5},
    "space": {
        "layers": {"distribution": "randint", "low": 1, "high": 4},
        "bridge_rank": {"distribution": "choice", "values": [0, 8]},
        "selector": "topk",
        "method": {"distribution": "choice", "values": [None, "fisher"]},
        "lr": {"distribution": "loguniform", "low": 1.0e-4, "high": 1.0e-2},
    },
}


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def with_space(**entries) -> dict:
    """VALID with some space entries replaced (an Ellipsis value removes the entry)."""
    raw = {**VALID, "space": {**VALID["space"], **entries}}
    return {**raw, "space": {k: v for k, v in raw["space"].items() if v is not ...}}


@pytest.mark.parametrize("path", SPACES, ids=[p.stem for p in SPACES])
def test_shipped_spaces_load_and_map_to_tune(path):
    space = load_space(path)
    assert space.teacher.family == {"llama": "llama", "qwen": "qwen3", "bert": "bert", "t5": "t5"}[path.stem]
    tune_space = space.to_tune()
    assert set(tune_space) == set(space.entries) and set(space.entries) <= set(PARAMETERS)
    assert isinstance(tune_space["selector"], Categorical) and len(tune_space["selector"].categories) >= 3
    lr = tune_space["lr"]
    assert isinstance(lr, Float) and isinstance(lr.get_sampler(), LogUniform) and 0 < lr.lower < lr.upper
    assert isinstance(tune_space["heal_epochs"], Integer)
    assert tune_space["trainable"] == "all" and tune_space["ce_weight"] == 1.0  # constants pass through
    assert {"temperature", "kd_weight", "hidden_weight", "bridge_rank", "keep"} <= set(space.searched)


def test_distributions_sample_inside_their_bounds(tmp_path):
    raw = with_space(keep={"distribution": "quniform", "low": 0.25, "high": 0.75, "q": 0.25}, layers=...)
    space = load_space(write(tmp_path, raw))
    keep = space.to_tune()["keep"]
    assert isinstance(keep.get_sampler(), Quantized)
    samples = {keep.sample() for _ in range(200)}
    assert samples == {0.25, 0.5, 0.75}
    assert space.depth_bounds() == ("keep", 0.25, 0.75)
    layers = load_space(write(tmp_path, VALID)).to_tune()["layers"]
    assert {layers.sample() for _ in range(200)} == {1, 2, 3}  # randint excludes high, as in ray.tune


def test_overrides_set_constants_fields_and_teacher(tmp_path):
    path = write(tmp_path, VALID)
    space = load_space(path, ["teacher.preset=small", "space.bridge_rank=4", "space.lr.high=0.05",
                              "protocol.seed=3"])
    assert space.teacher.preset == "small" and space.protocol.seed == 3
    assert space.entries["bridge_rank"] == 4 and "bridge_rank" not in space.searched
    assert space.entries["lr"] == {"distribution": "loguniform", "low": 1.0e-4, "high": 0.05}
    with pytest.raises(ValueError, match="not section.key=value"):
        load_space(path, ["preset=small"])


BAD = [
    (with_space(lr={"distribution": "normal", "low": 0.1, "high": 0.2}), r"space\.lr: unknown distribution 'normal'"),
    (with_space(lr={"distribution": "uniform", "low": 0.2, "high": 0.1}), r"space\.lr: low \(0.2\) must be < high"),
    (with_space(lr={"distribution": "uniform", "low": 0.1}), r"space\.lr: uniform needs \['high'\]"),
    (with_space(lr={"distribution": "uniform", "low": 0.1, "high": 0.2, "q": 0.1}),
     r"space\.lr: uniform takes only \['low', 'high'\], not \['q'\]"),
    (with_space(bridge_rank={"distribution": "choice", "values": []}), r"space\.bridge_rank\.values: must be a non-empty"),
    (with_space(bridge_rank={"distribution": "choice"}), r"space\.bridge_rank: choice needs \['values'\]"),
    (with_space(dropout={"distribution": "uniform", "low": 0.0, "high": 0.2}), r"unknown parameter\(s\) \['dropout'\]"),
    (with_space(bridge_rank={"distribution": "uniform", "low": 0.0, "high": 8.0}),
     r"space\.bridge_rank: bridge_rank is int; uniform cannot sample it"),
    (with_space(bridge_rank={"distribution": "choice", "values": [0, "eight"]}),
     r"space\.bridge_rank\.values\[1\]: must be int, got 'eight'"),
    (with_space(selector="best"), r"space\.selector: 'best' is out of range"),
    (with_space(lr={"distribution": "loguniform", "low": "1e-4", "high": 1.0e-2}),
     r"space\.lr\.low: must be float, got '1e-4' \(YAML reads 1e-3 as text"),
    (with_space(lr={"distribution": "loguniform", "low": 0.0, "high": 1.0e-2}), r"space\.lr: loguniform needs low > 0"),
    (with_space(layers={"distribution": "randint", "low": 0, "high": 3}), r"space\.layers\.low: 0 is out of range"),
    (with_space(keep={"distribution": "quniform", "low": 0.2, "high": 0.9, "q": 0.3}, layers=...),
     r"space\.keep: q \(0.3\) must be > 0 and divide"),
    (with_space(keep={"distribution": "uniform", "low": 0.5, "high": 1.5}, layers=...), r"space\.keep\.high: 1.5 is out"),
    (with_space(keep=0.5), r"exactly one of 'layers' .* got \['layers', 'keep'\]"),
    (with_space(bridge_rank=...), r"missing parameter\(s\) \['bridge_rank'\]"),
    (with_space(method=None, bridge_rank=4, lr=1.0e-3, layers=2), r"every parameter is a constant"),
    (with_space(selector=None), r"space\.selector: may not be null"),
    ({**VALID, "teacher": {**VALID["teacher"], "epochs": "many"}}, r"teacher\.epochs: must be int, got 'many'"),
    ({**VALID, "teacher": {**VALID["teacher"], "size": "big"}}, r"teacher: unknown key\(s\) \['size'\]"),
    ({**VALID, "search": {}}, r"unknown section\(s\) \['search'\]"),
    ({**VALID, "space": []}, r"space: must be a non-empty mapping"),
]


@pytest.mark.parametrize("raw, message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_space_names_the_key(tmp_path, raw, message):
    path = write(tmp_path, raw)
    with pytest.raises(ValueError, match=message) as error:
        load_space(path)
    assert str(path) in str(error.value)  # the file is named too


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_space(tmp_path / "nope.yaml")
