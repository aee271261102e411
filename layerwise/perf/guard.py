"""The guard every reported speedup passes: a disturbed measurement is measured again, and one that stays
disturbed is marked and never reported as a result.

Removing layers cannot make a model faster than its Amdahl bound, and a figure whose 95% CI is wider than
the figure itself says nothing. A speedup is disturbed when
  - its 95% CI lies wholly above the bound (the bound taken at the low end of f's own CI, so that the
    uncertainty of both is allowed for) and above the 95% CI of its measured ceiling, the reference's own
    k-layer copy timed in the same rounds (layerwise.perf.bench.kept_variant): the bound assumes a layer
    costs the same in a short model as in the long one, which on a CPU at batch 1 is off by a few percent,
    and a model cannot beat the reference's own layers at its depth by more than noise (the price: load that
    slows the reference's calls alone also makes its copy seem fast, so such a figure is left to the next
    rule),
  - its efficiency against the bound exceeds EFFICIENCY_LIMIT, or
  - its 95% CI is wider than the estimate (high - low > speedup).
Load that hits one model's rounds more than the other's does exactly this: on a 2-core machine with one
core taken, a teacher's batch-64 median rose eightfold and its compact model "ran" 6.5 times its bound.

Whoever measures calls `remeasure` with a function that measures some keys (batch sizes, or the pair of a
load test) with a number of rounds: every disturbed key is measured again with GROWTH times the rounds,
at most REMEASURES times. A key still disturbed after that keeps `status: "disturbed"`, its reasons and
the load average at the start and end of every attempt; displays print "disturbed" in place of the figure
(`speed_cell`). Callers: layerwise.perf.bench.benchmark (so `layerwise bench`, the pipeline, the study, the
baselines and the tuner) and serve.loadtest (`layerwise bench-serve`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

EFFICIENCY_LIMIT = 1.10  # measured/bound; timing noise on a quiet machine stays well inside 10%
REMEASURES = 2  # measurements after the first; with GROWTH 2 a 30-round bench ends with 120 rounds at most
GROWTH = 2


def rule(remeasures: int = REMEASURES) -> str:
    """The guard's rule in words, with the number of re-measures the caller allowed."""
    again = (f"re-measured with {GROWTH}x the rounds, at most {remeasures} times" if remeasures > 0
             else "not re-measured (remeasures 0)")
    return (f"disturbed when the speedup's 95% CI lies above the Amdahl bound and the reference's own k-layer "
            f"copy's CI, its efficiency exceeds "
            f"{EFFICIENCY_LIMIT:.0%}, or its CI is wider than the estimate; {again}")


RULE = rule()  # with the default re-measures


def disturbances(speedup: float, ci95: Sequence[float] | None, bound: float | None = None,
                 bound_high: float | None = None, ceiling_ci95: Sequence[float] | None = None) -> list[str]:
    """Why a speedup is not a result; [] when it is one.

    Args:
        speedup: the measured ratio (reference time / model time).
        ci95: its [low, high] 95% CI, or None when there is none.
        bound: the Amdahl bound, or None where it does not apply (a model whose layers differ from the
            reference's, e.g. quantized or width-pruned: nothing bounds it from the layer count).
        bound_high: the bound at the low end of f's CI (the highest bound the data allow); default `bound`.
        ceiling_ci95: the 95% CI of the reference's own k-layer copy's speedup, timed in the same rounds; a
            figure inside it is possible whatever the bound says. None where none was timed.
    """
    reasons = []
    if bound is not None:
        top = max(bound, bound_high or bound)
        ceiling = ceiling_ci95[1] if ceiling_ci95 is not None else None
        if ci95 is not None and ci95[0] > top and (ceiling is None or ci95[0] > ceiling):
            also = "" if ceiling is None else f" and the CI of the reference's own layers at its depth (up to {ceiling:.2f}x)"
            reasons.append(f"its 95% CI [{ci95[0]:.2f}, {ci95[1]:.2f}] lies above the Amdahl bound {top:.2f}x{also}")
        if speedup / bound > EFFICIENCY_LIMIT:
            reasons.append(f"efficiency {speedup / bound:.0%} of the Amdahl bound {bound:.2f}x exceeds "
                           f"{EFFICIENCY_LIMIT:.0%}")
    if ci95 is not None and ci95[1] - ci95[0] > speedup:
        reasons.append(f"its 95% CI [{ci95[0]:.2f}, {ci95[1]:.2f}] is wider than the estimate {speedup:.2f}x")
    return reasons


def judge(entry: dict) -> list[str]:
    """Mark one benchmark entry (a dict with "speedup", "speedup_ci95", "bound", "bound_high" and, where one
    was timed, "ceiling_ci95") in place: `status` "ok" or "disturbed" and `disturbed_because`. Returns the
    reasons."""
    reasons = disturbances(entry["speedup"], entry.get("speedup_ci95"), entry.get("bound"), entry.get("bound_high"),
                           entry.get("ceiling_ci95"))
    entry["status"] = "disturbed" if reasons else "ok"
    entry["disturbed_because"] = reasons
    return reasons


def remeasure(measure: Callable[[list[str], int], dict[str, dict]], keys: Sequence[str], rounds: int,
              remeasures: int = REMEASURES) -> tuple[dict[str, dict], list[dict]]:
    """Measure `keys`, then measure the disturbed ones again with more rounds, up to `remeasures` times.

    Args:
        measure: (keys, rounds) -> {key: part}; each part carries `status` ("ok" / "disturbed") and
            `disturbed_because` (see `judge`).
        keys: what to measure (e.g. batch sizes as strings); rounds: the first attempt's rounds.

    Returns:
        ({key: the last part measured for it}, attempts: [{"rounds", "keys", "disturbed": {key: reasons},
         "load_avg_start", "load_avg_end"}], one per attempt).
    """
    parts, attempts, todo = {}, [], list(keys)
    for attempt in range(remeasures + 1):
        start = list(os.getloadavg())
        measured = measure(todo, rounds)
        parts.update(measured)
        disturbed = {k: p["disturbed_because"] for k, p in measured.items() if p["status"] == "disturbed"}
        attempts.append({"rounds": rounds, "keys": todo, "disturbed": disturbed, "load_avg_start": start,
                         "load_avg_end": list(os.getloadavg())})
        todo, rounds = list(disturbed), rounds * GROWTH
        if not todo:
            break
    return parts, attempts


def verdict(attempts: Sequence[Mapping], remeasures: int = REMEASURES) -> dict:
    """The summary a result carries: overall status, what stayed disturbed, the rule with the re-measures
    allowed (`remeasure`'s), the load at the first start and the last end, and every attempt."""
    last = attempts[-1]["disturbed"]
    return {"status": "disturbed" if last else "ok", "disturbed": sorted(last), "rule": rule(remeasures),
            "load_avg_start": attempts[0]["load_avg_start"], "load_avg_end": attempts[-1]["load_avg_end"],
            "attempts": list(attempts)}


def speed_cell(entry: Mapping | None, fmt: Callable[[Mapping], str]) -> str:
    """What a table prints for one speed entry: `fmt(entry)` for a result, "disturbed (not a result)" for a
    disturbed one, "-" for none."""
    if not entry:
        return "-"
    if entry.get("status") == "disturbed":
        return "disturbed (not a result)"
    return fmt(entry)


def describe(guard: Mapping | None) -> str:
    """A table's note on its timings: the rule, the rounds of every attempt, and what stayed disturbed."""
    if not guard:
        return "These timings predate the bench guard: none was checked against its Amdahl bound."
    rounds = " -> ".join(str(a["rounds"]) for a in guard["attempts"])
    text = f"Bench guard: {guard['rule']}; rounds per attempt {rounds}."
    if guard["status"] == "disturbed":
        text += (f" Still disturbed at batch {', '.join(guard['disturbed'])} (load average "
                 f"{guard['load_avg_start'][0]:.1f} -> {guard['load_avg_end'][0]:.1f}): those speedups read "
                 f"'disturbed' and are not results.")
    return text
