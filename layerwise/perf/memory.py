"""Peak memory of one saved model, measured in a fresh Python subprocess (CPU RSS is process-wide).

    python -m layerwise.perf.memory --peak runs/teacher --batch-size 64 --max-len 50   # prints JSON

`peak_memories` measures several (model, batch size) pairs, in parallel subprocesses where the CPU and the
free memory allow: each figure is its own process's high-water mark, so running side by side changes no
figure, only the wall time (most of a measurement is the interpreter importing torch and transformers).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import torch

from layerwise.perf.cost import make_histories, parameter_bytes
from layerwise.device import inference_autocast


def peak_memory(model_dir: str | Path, batch_size: int, max_len: int, device: str = "cpu", seed: int = 0) -> dict:
    """Peak memory of loading `model_dir` and scoring one batch, measured in a fresh Python subprocess.

    CPU: RSS from /proc (VmHWM is reset after loading, so `peak_rss_bytes` is the inference peak),
    `peak_over_baseline_bytes` = peak minus the RSS of the bare interpreter after imports. CUDA:
    torch.cuda.max_memory_allocated. Raises RuntimeError with the child's stderr if it fails.
    """
    cmd = [sys.executable, "-m", "layerwise.perf.memory", "--peak", str(model_dir), "--batch-size", str(batch_size),
           "--max-len", str(max_len), "--device", device, "--seed", str(seed),
           "--threads", str(torch.get_num_threads())]
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"peak-memory subprocess failed for {model_dir}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# What one measuring subprocess holds beyond its model: the interpreter with torch and transformers imported
# (about 470 MB measured as baseline_rss_bytes), rounded up.
INTERPRETER_BYTES = 768 * 2**20


def parallel_measurements(model_dirs: list[str | Path], device: str = "cpu") -> int:
    """How many peak-memory subprocesses may run at once: one per CPU, as many as the available memory holds
    at the interpreter plus three times the largest model's files each (load, copy and activations), and one
    on an accelerator, whose memory the processes would share."""
    if not str(device).startswith("cpu"):
        return 1
    largest = max((sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file()) for d in model_dirs), default=0)
    by_memory = psutil.virtual_memory().available // (INTERPRETER_BYTES + 3 * largest)
    return max(1, min(os.cpu_count() or 1, by_memory))


def peak_memories(jobs: list[tuple[str | Path, int]], max_len: int, device: str = "cpu", seed: int = 0) -> list[dict]:
    """`peak_memory` for every (model_dir, batch_size) in `jobs`, in that order, `parallel_measurements` at a
    time. Raises the first subprocess's failure."""
    workers = min(len(jobs), parallel_measurements([d for d, _ in jobs], device)) or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda job: peak_memory(job[0], job[1], max_len, device, seed=seed), jobs))


def peak_rss_bytes() -> int:
    """This program's peak RSS so far: VmHWM on Linux (ru_maxrss there keeps the peak of the image before
    exec, so a script started by a big process would read that process's peak), ru_maxrss elsewhere."""
    return _hwm_bytes()[0]


def _hwm_bytes() -> tuple[int, str]:
    try:
        status = Path("/proc/self/status").read_text()
        return 1024 * next(int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmHWM:")), "VmHWM"
    except (OSError, StopIteration):
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "ru_maxrss"


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: reset the RSS high-water mark
        return True
    except OSError:
        return False


def _measure_peak(model_dir: str, batch_size: int, max_len: int, device: str, seed: int) -> dict:
    """Runs in the fresh subprocess: baseline after imports, load, reset the high-water mark, score."""
    from layerwise.compression.compact import load_compact  # imports every family's modeling code

    process = psutil.Process()
    baseline = process.memory_info().rss
    model = load_compact(model_dir).to(device).eval()
    histories = make_histories(batch_size, max_len, model.n_items, seed).to(device)
    loaded = process.memory_info().rss
    load_peak, method = _hwm_bytes()
    reset = _reset_hwm()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode(), inference_autocast(device):  # as `layerwise.perf.bench` times it
        for _ in range(2):  # the first call may allocate lazily initialised state; the peak covers both
            model.score(histories)
    peak, method = _hwm_bytes()
    out = {"status": "measured", "method": method, "device": device, "pid": os.getpid(), "batch_size": batch_size,
           "max_len": max_len, "threads": torch.get_num_threads(), "baseline_rss_bytes": baseline,
           "loaded_rss_bytes": loaded, "load_peak_rss_bytes": load_peak, "peak_rss_bytes": peak,
           "peak_scope": "inference (high-water mark reset after loading)" if reset else "load + inference",
           "peak_over_baseline_bytes": peak - baseline, "param_bytes": parameter_bytes(model)}
    if device.startswith("cuda"):
        out["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return out


def main(argv: list[str] | None = None) -> None:
    """Subprocess entry: `python -m layerwise.perf.memory --peak DIR --batch-size 64 --max-len 50` prints JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak", required=True, metavar="MODEL_DIR", help="saved model directory")
    for flag, default in (("--batch-size", 64), ("--max-len", 50), ("--seed", 0), ("--threads", 0)):
        parser.add_argument(flag, type=int, default=default)  # --threads: the parent's torch threads
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(_measure_peak(args.peak, args.batch_size, args.max_len, args.device, args.seed)))


if __name__ == "__main__":
    main()
