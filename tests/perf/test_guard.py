"""The bench guard on real timings: a disturbance injected into the teacher's rounds is re-measured, and
one that persists is marked disturbed and never printed as a speedup; a clean measurement passes unmarked.
The timings come from sleeping layers (tests/helpers/timing.py), so they hold on a busy machine.
"""

from __future__ import annotations

import copy
import json

import torch

from layerwise.perf.bench import benchmark
from layerwise.perf.table import format_table
from layerwise.perf.guard import EFFICIENCY_LIMIT, GROWTH, REMEASURES, describe, disturbances, rule
from layerwise.models import SequentialRecommender, build_backbone, preset_config
from tests.helpers.timing import LAYER_SECONDS, disturb, sleep_in_layers

RUNS, WARMUP = 15, 2


def sleeping_pair(seconds: float = LAYER_SECONDS) -> tuple[SequentialRecommender, SequentialRecommender]:
    """A 4-layer teacher and a copy keeping layer 1; every layer sleeps `seconds` per call."""
    torch.manual_seed(0)
    teacher = SequentialRecommender(build_backbone(preset_config("llama", "tiny", max_len=8, num_hidden_layers=4)),
                                    20).eval()
    sleep_in_layers(teacher, seconds)
    compact = copy.deepcopy(teacher)  # the hooks come along with the kept layer
    compact.family.keep_layers(compact.backbone, [1])
    return teacher, compact


def run(teacher, compact) -> dict:
    return benchmark({"teacher": teacher, "compact": compact}, batch_sizes=(4,), runs=RUNS, warmup=WARMUP,
                     max_len=8, reference="teacher")


def test_the_rule_on_the_figures_that_started_it():
    # 25.47x [1.87, 45.90] against a bound of 3.89x: the headline of a run on a loaded machine.
    reasons = disturbances(25.47, [1.87, 45.90], 3.89)
    assert len(reasons) == 2 and "efficiency 655%" in reasons[0] and "wider than the estimate" in reasons[1]
    assert disturbances(3.48, [3.40, 3.55], 3.89) == []  # a quiet run's figure
    above = disturbances(3.70, [3.62, 3.80], 3.50, bound_high=3.55)  # efficiency 106%, CI above the bound
    assert len(above) == 1 and "lies above the Amdahl bound 3.55x" in above[0]
    assert disturbances(3.70, [3.52, 3.80], 3.50, bound_high=3.55) == []  # f's CI allows it
    # Above the bound but within what the reference's own layers reached at that depth in the same rounds
    # (seed 0 of the SmolLM2 study at batch 1: ours 3.68x [3.64, 3.74] against a bound of 3.62x, which the
    # teacher's own last 8 layers beat too): the bound's model is off, the figure is possible.
    assert disturbances(3.68, [3.64, 3.74], 3.62, bound_high=3.63, ceiling_ci95=[3.66, 3.91]) == []
    beyond = disturbances(3.98, [3.93, 4.02], 3.62, bound_high=3.63, ceiling_ci95=[3.66, 3.91])
    assert len(beyond) == 1 and "own layers at its depth (up to 3.91x)" in beyond[0]
    assert any("efficiency" in why for why in disturbances(4.10, [4.00, 4.20], 3.62, ceiling_ci95=[3.9, 4.3]))
    assert disturbances(1.8, [1.7, 1.9], None) == []  # int8: no layer bound, a tight CI is a result
    assert disturbances(1.8, [0.5, 2.6], None) != []
    assert disturbances(EFFICIENCY_LIMIT * 3.0 + 0.01, [3.2, 3.4], 3.0) != []


def test_an_undisturbed_measurement_passes_unmarked():
    # 4x the sleep of the other tests: at 10 ms a layer, beside a study's three workers on 2 cores (load
    # average 11), late wake-ups alone put the first attempt at 112% of the bound, and the guard timed it again.
    teacher, compact = sleeping_pair(4 * LAYER_SECONDS)
    result = run(teacher, compact)
    entry = result["models"]["compact"]["batches"]["4"]
    assert entry["status"] == "ok" and entry["disturbed_because"] == [], entry
    # The sleeps put the compact model at its Amdahl bound, so a late wake-up can push one attempt's CI just
    # past it (seen: [3.95, 3.99] against 3.95 on a quiet machine). The guard measuring again is then right;
    # what must hold is that the clean measurement ends unmarked, with the rounds of the attempt it kept.
    attempts = result["guard"]["attempts"]
    assert result["status"] == "ok" and attempts[-1]["disturbed"] == {}
    assert entry["runs"] == attempts[-1]["rounds"] == RUNS * GROWTH ** (len(attempts) - 1)
    assert 0.8 < entry["efficiency"] <= EFFICIENCY_LIMIT  # what the sleeps make it: at the bound
    # The wall figure is what the sleeps control and what the guard judges. The cpu-time cell beside it
    # times only Python between the sleeps (cpu-time f near 0.2), so it is judged but not asserted here.
    table = format_table(result)
    row = next(line for line in table.splitlines() if line.startswith("| compact |"))
    assert row.split(" | ")[8].startswith(f"{entry['speedup']:.2f} [") and "DISTURBED" not in table


def test_a_passing_disturbance_is_measured_again_and_clears():
    teacher, compact = sleeping_pair()
    seen = disturb(teacher, calls=WARMUP + RUNS)  # the whole first attempt, nothing after it
    result = run(teacher, compact)
    first, second = result["guard"]["attempts"]
    assert first["rounds"] == RUNS and first["disturbed"]["4"]  # seen, and why
    assert second["rounds"] == GROWTH * RUNS and second["disturbed"] == {}
    assert seen[0] == 2 * WARMUP + RUNS + GROWTH * RUNS  # the re-measure really called the teacher again
    entry = result["models"]["compact"]["batches"]["4"]
    assert result["status"] == "ok" and entry["status"] == "ok" and entry["runs"] == GROWTH * RUNS


def test_a_persisting_disturbance_is_marked_and_never_printed_as_a_speedup():
    teacher, compact = sleeping_pair()
    disturb(teacher, calls=None)
    result = run(teacher, compact)
    rounds = [a["rounds"] for a in result["guard"]["attempts"]]
    assert rounds == [RUNS * GROWTH ** i for i in range(REMEASURES + 1)]
    entry = result["models"]["compact"]["batches"]["4"]
    assert entry["status"] == "disturbed" and entry["efficiency"] > EFFICIENCY_LIMIT
    assert any("efficiency" in why for why in entry["disturbed_because"])
    assert result["status"] == "disturbed" and result["guard"]["disturbed"] == ["4"]
    assert len(result["guard"]["load_avg_start"]) == 3 and len(result["guard"]["load_avg_end"]) == 3
    assert json.loads(json.dumps(result))["models"]["compact"]["batches"]["4"]["status"] == "disturbed"
    table = format_table(result)
    row = next(line for line in table.splitlines() if line.startswith("| compact |"))
    assert row.split(" | ")[8] == "disturbed (not a result)" and f"{entry['speedup']:.2f}" not in row
    assert "DISTURBED, not a result: compact at batch 4" in table


def test_the_rule_a_result_carries_names_the_remeasures_its_caller_allowed():
    teacher, compact = sleeping_pair()
    disturb(teacher, calls=None)
    result = benchmark({"teacher": teacher, "compact": compact}, batch_sizes=(4,), runs=RUNS, warmup=WARMUP,
                       max_len=8, reference="teacher", remeasures=0)
    assert len(result["guard"]["attempts"]) == 1 and result["status"] == "disturbed"
    assert result["guard"]["rule"].endswith("not re-measured (remeasures 0)")
    assert describe(result["guard"]).startswith(f"Bench guard: {rule(0)}; rounds per attempt {RUNS}.")
    assert f"at most {REMEASURES} times" in rule() and "at most 1 times" in rule(1)
