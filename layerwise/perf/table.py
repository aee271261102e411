"""Markdown rendering of a `layerwise.perf.bench` result: one row per model and batch size, then the
non-layer fraction, the measured ceilings and what the guard did."""

from __future__ import annotations

from layerwise.perf.guard import speed_cell

_MB = 2**20


def _memory_cell(memory: dict) -> str:
    if memory.get("status") != "measured":
        return "not measured"
    if "cuda_peak_allocated_bytes" in memory:
        return f"{memory['cuda_peak_allocated_bytes'] / _MB:.1f} (GPU allocator)"
    if "peak_over_baseline_bytes" in memory:
        return f"{memory['peak_over_baseline_bytes'] / _MB:.1f} (abs {memory['peak_rss_bytes'] / _MB:.0f})"
    return f"{memory['peak_bytes'] / _MB:.1f}"


def _speed(e: dict) -> str:
    lo, hi = e["speedup_ci95"]
    return f"{e['speedup']:.2f} [{lo:.2f}, {hi:.2f}]"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _row(name: str, model: dict, batch: str, e: dict) -> str:
    cells = [name, model["n_layers"], f"{model['param_bytes'] / _MB:.2f}", batch, f"{e['median_ms']:.3f}",
             f"{e['p95_ms']:.3f}", f"{e['std_ms']:.3f}", f"{e['users_per_s']:.0f}", "-", "-", "-", "-",
             f"{e['flops']['total'] / 1e9:.4f}", _memory_cell(e["memory"])]
    if "speedup" in e:
        cpu, ok = e["cpu"], e.get("status") != "disturbed"
        cells[8:12] = [speed_cell(e, _speed), _ratio(e["bound"]), _ratio(e["efficiency"]) if ok else "-",
                       speed_cell(cpu, lambda c: f"{c['speedup']:.2f} / {_ratio(c['efficiency'])}")]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _guard_lines(result: dict) -> list[str]:
    """What the guard did: the rounds of every attempt, and each figure that stayed disturbed, with why."""
    guard = result.get("guard")
    if not guard:
        return []
    rounds = " -> ".join(f"{a['rounds']} (batch {', '.join(a['keys'])})" for a in guard["attempts"])
    lines = ["", f"Rounds per attempt: {rounds}. Load average {guard['load_avg_start'][0]:.1f} at the start, "
             f"{guard['load_avg_end'][0]:.1f} at the end."]
    for name, model in result["models"].items():
        for batch, e in model["batches"].items():
            if e.get("status") == "disturbed":
                lines.append(f"DISTURBED, not a result: {name} at batch {batch}: " + "; ".join(e["disturbed_because"]))
    return lines


def format_table(result: dict) -> str:
    """Markdown table of a `benchmark` / `bench_dirs` result, one row per model and batch size."""
    env, settings = result["env"], result["settings"]
    header = ["model", "layers", "params MB", "batch", "median ms", "p95 ms", "std ms", "users/s",
              "speedup [95% CI]", "bound", "efficiency", "cpu-time speedup / eff", "GFLOPs", "peak MB over baseline"]
    lines = [f"Reference: {settings['reference']}; {env['torch_threads']} torch threads on {env['device']}; "
             f"{settings['runs']} interleaved runs after {settings['warmup']} warm-up; T = {settings['max_len']}; "
             f"load average {env['load_avg_start'][0]:.1f} on {env['cpu_count']} CPUs.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [_row(name, model, batch, e) for name, model in result["models"].items()
              for batch, e in model["batches"].items()]
    mfu = [f"{name} at batch {batch}: {e['mfu']:.2%}" for name, model in result["models"].items()
           for batch, e in model["batches"].items() if e.get("mfu") is not None]
    if mfu:
        lines += ["", f"Model FLOPs utilisation against the {env.get('gpu')}'s published bf16 peak "
                  f"({env.get('peak_bf16_tflops')} TFLOP/s): " + "; ".join(mfu) + "."]
    if result.get("nonlayer"):
        parts = [f"batch {b}: f = {v['f']:.3f} [{v['f_ci95'][0]:.3f}, {v['f_ci95'][1]:.3f}] "
                 f"({v['median_ms']:.3f} ms; cpu-time f = {v['cpu_f']:.3f})" for b, v in result["nonlayer"].items()]
        lines += ["", "Non-layer fraction (0-layer copy of the reference): " + "; ".join(parts) + "."]
    ceilings = sorted({(b, model["n_layers"], e["ceiling"], *e["ceiling_ci95"]) for model in result["models"].values()
                       for b, e in model["batches"].items() if e.get("ceiling") is not None},
                      key=lambda c: (int(c[0]), c[1]))
    if ceilings:
        lines += ["", "Measured ceilings (the reference's own last k layers, timed in the same rounds): " + "; ".join(
            f"batch {b}, k = {k}: {c:.2f}x [{lo:.2f}, {hi:.2f}]" for b, k, c, lo, hi in ceilings) + "."]
    return "\n".join(lines + _guard_lines(result))
