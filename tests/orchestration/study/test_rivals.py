"""Where ours gains or loses against the rivals that answer the study's question, by slice, from the seeds'
per-user tables (orchestration.study.results.rivals) to the report's table."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from layerwise.evaluation.scenarios import difference_slices
from layerwise.report import write_report
from orchestration.study.results import rivals
from orchestration.study.rows import Rows
from tests.helpers.fake_data import random_data


def per_user_rows(tmp_path, name: str, values_by_seed: dict[int, np.ndarray]) -> list[dict]:
    rows = []
    for seed, values in values_by_seed.items():
        path = tmp_path / f"{name}-{seed}.parquet"
        pq.write_table(pa.table({"user": np.arange(len(values)), "ndcg@10": values}), path)
        rows.append({"row": name, "group": name, "table": "baselines", "seed": seed, "per_user": str(path),
                     "means": {"ndcg@10": float(values.mean())}})
    return rows


def test_a_loss_on_rare_targets_shows_in_that_slice_alone(tmp_path):
    data = random_data(n_users=240, n_items=40, min_len=5, max_len=60, seed=0)
    slices = difference_slices(data)
    rare = next(v for k, v in slices.items() if k.startswith("target_pop=low"))
    rng = np.random.default_rng(1)
    scratch = {s: rng.uniform(0.1, 0.3, data.n_users) for s in (0, 1)}
    ours = {s: v.copy() for s, v in scratch.items()}
    for v in ours.values():
        v[rare] *= 0.5  # ours halves the rival's metric on rare targets, and equals it elsewhere
    rows = (per_user_rows(tmp_path, "ours", ours) + per_user_rows(tmp_path, "scratch", scratch)
            + per_user_rows(tmp_path, "truncated", {0: scratch[0]})  # one seed only: not a rival here
            + per_user_rows(tmp_path, "random", {s: v * 0.05 for s, v in scratch.items()}))  # unhealed: no rival
    entry = rivals(Rows(rows, [0, 1]), data)
    assert {r["rival"] for r in entry["rows"]} == {"scratch"} and entry["seeds"] == [0, 1]
    by_slice = {r["slice"]: r for r in entry["rows"]}
    low = next(r for k, r in by_slice.items() if k.startswith("target_pop=low"))
    high = next(r for k, r in by_slice.items() if k.startswith("target_pop=high"))
    assert low["n"] == len(rare) and abs(low["ratio"] - 0.5) < 1e-9 and low["ci95"][1] < 0.6
    assert low["p_holm"] < 0.001 and high["ratio"] == 1.0 and high["p_holm"] == 1.0
    everyone = by_slice["all users"]
    assert everyone["n"] == data.n_users and 0.5 < everyone["ratio"] < 1.0
    assert sum(r["n"] for k, r in by_slice.items() if k.startswith("history_len=")) == data.n_users

    md = write_report({"rivals": entry}, tmp_path / "report")["markdown"].read_text()
    section = md.split("## Rivals by slice")[1].split("## ")[0]
    assert f"| scratch | all users | {data.n_users} |" in section and "50.0% [" in section


def test_no_rival_on_every_seed_means_no_table(tmp_path):
    data = random_data(n_users=30, n_items=10, min_len=4, max_len=10, seed=0)
    values = np.full(data.n_users, 0.2)
    rows = per_user_rows(tmp_path, "ours", {0: values, 1: values}) + per_user_rows(tmp_path, "scratch", {0: values})
    assert rivals(Rows(rows, [0, 1]), data) is None


def test_random_layers_are_a_rival_healed(tmp_path):
    """Random layers answer the question once healed as ours is; their unhealed row is a floor, not a rival."""
    data = random_data(n_users=60, n_items=20, min_len=4, max_len=20, seed=0)
    rng = np.random.default_rng(2)
    healed = {s: rng.uniform(0.1, 0.3, data.n_users) for s in (0, 1)}
    rows = (per_user_rows(tmp_path, "ours", healed) + per_user_rows(tmp_path, "random +heal", healed)
            + per_user_rows(tmp_path, "random", {s: v * 0.05 for s, v in healed.items()}))
    entry = rivals(Rows(rows, [0, 1]), data)
    everyone = next(r for r in entry["rows"] if r["slice"] == "all users")
    assert {r["rival"] for r in entry["rows"]} == {"random +heal"} and everyone["ratio"] == 1.0
