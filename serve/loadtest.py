"""Load benchmark: the compact model, then the full teacher, each deployed in turn with the same settings.

Smallest CPU run (loopback only; two saved model directories trained on the same data set):
    .venv/bin/python -m serve.loadtest --model runs/compact --teacher runs/teacher \
        --requests 200 --concurrency 8 --json runs/loadtest.json

Each model gets the same seeded request bodies: real histories (the most recent max_len raw item ids of
random users' test-stage histories). N requests go out from C client threads, each with its own
keep-alive connection; the report gives requests/s, p50/p95/p99 latency, errors by status, and the
batch sizes the replica saw. Client and server share the machine, so on a small box the client's own
CPU use lowers both models' figures alike; compare the two, not the absolute numbers. Their ratios pass
the bench guard (layerwise.perf.guard) against the bound L/k: a pair that load disturbed is loaded again,
and one that stays disturbed is reported as such, without a ratio.

With `--sweep 8,16,32,...` it runs a concurrency sweep of each model instead (serve/sweep.py): goodput,
latency and refusals per level under closed-loop load, a JSON report and a plot.
"""

import argparse
import http.client
import json
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from layerwise.perf.guard import REMEASURES, disturbances, remeasure, verdict
from layerwise.data import load_dataset
from layerwise.models.checkpoint import read_manifest
from serve.schemas import add_replica_arguments, replica_options
from serve.sweep import get_json, loopback, parse_levels, sweep_main

APP_NAME = "loadtest"
ROUTE = "/loadtest"


def request_bodies(data, n: int, max_len: int, seed: int = 0, k: int = 10) -> list[bytes]:
    """n JSON bodies {"history": [raw ids], "k": k, "exclude_seen": true} of random users (seeded)."""
    users = np.random.default_rng(seed).integers(0, data.n_users, size=n)
    bodies = []
    for u in users.tolist():
        history = data.history(u, "test")[-max_len:]
        raw = [data.item_ids[i] for i in history.tolist()]
        bodies.append(json.dumps({"history": raw, "k": k, "exclude_seen": True}).encode())
    return bodies


def run_load(url: str, bodies: list[bytes], concurrency: int, timeout_s: float = 30.0) -> dict[str, Any]:
    """POST every body once to `url` (loopback only) from `concurrency` threads; latency and error figures,
    and `samples_ms`, the latency of every successful request.

    Args:
        url: e.g. "http://127.0.0.1:8000/loadtest/recommend".
        bodies: request bodies; len(bodies) requests in all.
        concurrency: client threads, each with one keep-alive connection.
        timeout_s: per-request socket timeout; a timeout counts as an error.
    """
    parts = loopback(url)
    if concurrency < 1 or not bodies:
        raise ValueError(f"need concurrency >= 1 and at least one body, got {concurrency} and {len(bodies)}")
    jobs, lock = iter(bodies), threading.Lock()
    latencies: list[float] = []
    statuses: Counter[str] = Counter()

    def worker() -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
        while True:
            with lock:
                body = next(jobs, None)
            if body is None:
                break
            status, seconds = _post(conn, parts.path, body)
            if status == "disconnected":
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
            with lock:
                statuses[status] += 1
                if status == "200":
                    latencies.append(seconds)
        conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {**summarize(latencies, statuses, time.perf_counter() - started, concurrency),
            "samples_ms": [1000.0 * x for x in latencies]}


def _post(conn: http.client.HTTPConnection, path: str, body: bytes) -> tuple[str, float]:
    start = time.perf_counter()
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()  # drain, or the keep-alive connection cannot carry the next request
        return str(response.status), time.perf_counter() - start
    except (OSError, http.client.HTTPException):
        conn.close()
        return "disconnected", time.perf_counter() - start


def summarize(latencies: list[float], statuses: Counter, seconds: float, concurrency: int) -> dict[str, Any]:
    """Throughput and latency percentiles (ms, successful requests only) of one load run."""
    total = sum(statuses.values())
    ms = np.asarray(latencies) * 1000.0
    pct = (lambda q: float(np.percentile(ms, q))) if len(ms) else (lambda q: float("nan"))
    return {
        "requests": total, "concurrency": concurrency, "seconds": seconds,
        "requests_per_s": total / seconds if seconds > 0 else float("nan"),
        "latency_ms": {"p50": pct(50), "p95": pct(95), "p99": pct(99),
                       "mean": float(ms.mean()) if len(ms) else float("nan"),
                       "max": float(ms.max()) if len(ms) else float("nan")},
        "errors": total - statuses.get("200", 0), "statuses": dict(statuses),
    }


def measure_model(label: str, model: str, port: int, bodies: list[bytes], concurrency: int,
                  app_args: dict[str, Any], warmup: int = 20) -> dict[str, Any]:
    """Deploy `model` at /loadtest on the running Serve instance, warm it up, load it, delete it."""
    from ray import serve

    from serve.app import build_app

    serve.run(build_app({**app_args, "model": model}), name=APP_NAME, route_prefix=ROUTE)
    base = f"http://127.0.0.1:{port}{ROUTE}"
    try:
        if warmup:
            run_load(f"{base}/recommend", bodies[:warmup], min(concurrency, warmup))
        before = get_json(f"{base}/model")["batching"]
        result = run_load(f"{base}/recommend", bodies, concurrency)
        info = get_json(f"{base}/model")
    finally:
        serve.delete(APP_NAME)
    after = info["batching"]
    calls, requests = after["calls"] - before["calls"], after["requests"] - before["requests"]
    model_s = after["model_seconds"] - before["model_seconds"]
    waited_s = after["request_model_seconds"] - before["request_model_seconds"]
    latency_s = sum(result["samples_ms"]) / 1000.0
    return {"label": label, "model": model, "layers": info["layers"], "kept_layers": info["kept_layers"],
            "teacher_layers": info["teacher_layers"], **result,
            "batching": {"model_calls": calls, "mean_batch_size": requests / calls if calls else 0.0,
                         "largest_batch": after["largest"]},
            # The model call's share of a request's time; the rest is HTTP, the Serve proxy and the batch
            # queue. busy: the fraction of the run's wall time the replica spent in model calls.
            "model_time": {"ms_per_call": 1000.0 * model_s / calls if calls else float("nan"),
                           "share_of_latency": waited_s / latency_s if latency_s > 0 else float("nan"),
                           "busy": model_s / result["seconds"] if result["seconds"] > 0 else float("nan")}}


def benchmark(models: dict[str, str], port: int, requests: int, concurrency: int, seed: int = 0,
              app_args: dict[str, Any] | None = None, warmup: int = 20, remeasures: int = REMEASURES) -> dict[str, Any]:
    """Load each of `models` (label -> dir or URI) in turn with the same bodies on a running Serve.

    All models must come from the same data set (same fingerprint), so that the same histories are valid.
    With a compact and a teacher, their ratios pass layerwise.perf.guard: a disturbed pair is loaded again
    with twice the requests, at most `remeasures` times, and one still disturbed reports no ratio.
    """
    app_args = dict(app_args or {})
    # Every app loads this catalogue, a model whose manifest does not name it included.
    app_args["dataset"], data, max_len = _shared_data(list(models.values()), app_args)
    paired = {"compact", "teacher"} <= set(models)

    def measure(keys: list[str], n: int) -> dict[str, dict]:
        bodies = request_bodies(data, n, max_len, seed)
        runs = [measure_model(label, path, port, bodies, concurrency, app_args, warmup)
                for label, path in models.items()]
        samples = {r["label"]: r.pop("samples_ms") for r in runs}
        ratio = compare(runs, samples, seed) if paired else {"status": "ok", "disturbed_because": []}
        return {key: {"runs": runs, **ratio} for key in keys}

    remeasures = remeasures if paired else 0
    parts, attempts = remeasure(measure, ["compact_vs_teacher"], requests, remeasures)
    part = parts["compact_vs_teacher"]
    guard = verdict(attempts, remeasures)
    report = {"requests": part["runs"][0]["requests"], "concurrency": concurrency, "seed": seed,
              "dataset": data.name, "settings": {k: v for k, v in app_args.items() if k != "model"},
              "runs": part["runs"], "status": guard["status"], "guard": guard}
    if paired:
        report["compact_vs_teacher"] = {k: v for k, v in part.items() if k != "runs"}
    return report


def compare(runs: list[dict], samples: dict[str, list[float]], seed: int) -> dict[str, Any]:
    """Compact over teacher: throughput ratio and p50 latency ratio (with a bootstrap 95% CI over requests),
    judged against the Amdahl bound at f = 0 (L/k: HTTP and batching can only lower it). A disturbed pair
    carries its reasons and no ratio."""
    by = {r["label"]: r for r in runs}
    compact, teacher = by["compact"], by["teacher"]
    ratio = {"throughput_ratio": compact["requests_per_s"] / teacher["requests_per_s"],
             "p50_latency_ratio": teacher["latency_ms"]["p50"] / compact["latency_ms"]["p50"],
             "p50_latency_ratio_ci95": _median_ratio_ci(samples["teacher"], samples["compact"], seed),
             "bound": (teacher["layers"] / compact["layers"]
                       if compact["teacher_layers"] == teacher["layers"] and compact["layers"] else None)}
    reasons = [f"p50 latency ratio: {why}" for why in disturbances(
        ratio["p50_latency_ratio"], ratio["p50_latency_ratio_ci95"], ratio["bound"])]
    reasons += [f"throughput ratio: {why}" for why in disturbances(ratio["throughput_ratio"], None, ratio["bound"])]
    if reasons:
        ratio.update(throughput_ratio=None, p50_latency_ratio=None, p50_latency_ratio_ci95=None)
    return {**ratio, "status": "disturbed" if reasons else "ok", "disturbed_because": reasons}


def _median_ratio_ci(numerator: list[float], denominator: list[float], seed: int, n_boot: int = 2000) -> list[float]:
    """Bootstrap 95% CI of median(numerator) / median(denominator); the two loads ran apart, so each is
    resampled on its own."""
    if not numerator or not denominator:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    num, den = np.asarray(numerator), np.asarray(denominator)
    ratios = (np.median(num[rng.integers(0, len(num), (n_boot, len(num)))], axis=1)
              / np.median(den[rng.integers(0, len(den), (n_boot, len(den)))], axis=1))
    return [float(x) for x in np.percentile(ratios, [2.5, 97.5])]


def _shared_data(models: list[str], app_args: dict[str, Any]):
    """(name, data, max_len) of the data set every model was trained on."""
    from serve.app import resolve_model

    manifests = [read_manifest(resolve_model(m, app_args.get("tracking_uri"), app_args.get("download_dir")))
                 for m in models]
    prints = {m.get("data_fingerprint") for m in manifests}
    if len(prints) > 1:
        raise ValueError(f"models {models} were trained on different data sets; their loads would not compare")
    # The fingerprints match, so any manifest that names the data set names the one they share.
    name = app_args.get("dataset") or next((m["dataset"] for m in manifests if m.get("dataset")), None)
    if not name:
        raise ValueError(f"no manifest of {models} names its data set; pass --dataset (and --data-dir if needed)")
    data = load_dataset(name, data_dir=app_args.get("data_dir"), cache_dir=app_args.get("cache_dir"),
                        progress=False)
    return name, data, int(manifests[0].get("max_len") or 50)


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="compact model directory or MLflow URI")
    p.add_argument("--teacher", default=None, help="full teacher model directory or MLflow URI")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--port", type=int, default=0,
                   help="Serve HTTP port (0: a free one); must match Serve if it is already running")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=20, help="untimed requests before each model's run")
    p.add_argument("--remeasures", type=int, default=REMEASURES,
                   help="times a disturbed compact/teacher pair is loaded again, with twice the requests")
    p.add_argument("--dataset", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--data-dir", default=None,
                   help="local folder of the data set's files (default $LAYERWISE_DATA_DIR)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for models:/ or runs:/ models")
    p.add_argument("--download-dir", default=None, help="where MLflow models are downloaded")
    add_replica_arguments(p)
    sweep = p.add_argument_group("concurrency sweep (--sweep): each model alone, closed-loop clients per level")
    sweep.add_argument("--sweep", default=None, metavar="LEVELS",
                       help="comma-separated client counts, e.g. 8,16,32,64,128,256; replaces --requests/--concurrency")
    sweep.add_argument("--level-seconds", type=float, default=15.0, help="measured window of a level (default: 15)")
    sweep.add_argument("--level-requests", type=int, default=5000,
                       help="a level's window also closes after this many answers (default: 5000)")
    sweep.add_argument("--warmup-seconds", type=float, default=3.0, help="untimed start of a level (default: 3)")
    sweep.add_argument("--timeout-s", type=float, default=30.0, help="a request unanswered this long is a timeout")
    sweep.add_argument("--ignore-retry-after", action="store_true",
                       help="a refused client sends again at once instead of waiting its Retry-After")
    sweep.add_argument("--overload-pairs", type=int, default=3, metavar="N",
                       help="after the sweep, N rounds of the peak's level and the level at 4x it back to back, "
                            "alternating which goes first; the acceptance is read from the median round, which "
                            "the machine's speed drifting between levels does not move (default: 3; 0: none)")
    sweep.add_argument("--p99-slo-ms", type=float, default=None, help="p99 objective drawn on the plot")
    sweep.add_argument("--plot", default=None, help="PNG of the sweep (default: the --json path with .png)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; Ray and Serve are started here unless this process is already connected."""
    args = _parser().parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        raise SystemExit("--requests and --concurrency must be >= 1")
    levels = _sweep_levels(args)
    import ray
    from ray import serve

    from orchestration.distributed.ray_runtime import ray_session
    from serve.app import proxy_admission
    from serve.capacity import proxy_environment

    port = args.port or free_port()
    app_args = {"dataset": args.dataset, "cache_dir": args.cache_dir, "tracking_uri": args.tracking_uri,
                "data_dir": str(Path(args.data_dir).resolve()) if args.data_dir else None,
                "download_dir": args.download_dir, **replica_options(args)}
    if not levels:  # the compact/teacher comparison measures speed, not admission: every request is let in
        app_args["max_ongoing_requests"] = max(64, args.max_batch_size, args.concurrency)
    gated = levels and args.proxy_gate  # the sweep measures admission: with the proxy's gate unless told not to
    proxy_environment(proxy_admission(args.num_replicas, app_args) if gated else None)
    app_args["proxy_gate"] = bool(gated)
    models = {"compact": args.model, **({"teacher": args.teacher} if args.teacher else {})}
    owns_ray = not ray.is_initialized()
    with ray_session():
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            if levels:
                app_args["dataset"], data, max_len = _shared_data(list(models.values()), app_args)
                bodies = request_bodies(data, 2000, max_len, args.seed)
                return sweep_main(models, port, levels, app_args, bodies, args)
            report = benchmark(models, port, args.requests, args.concurrency, args.seed, app_args, args.warmup,
                               args.remeasures)
        finally:
            if owns_ray:
                serve.shutdown()
    _print(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if all(r["errors"] == 0 for r in report["runs"]) else 1


def _sweep_levels(args) -> list[int]:
    """--sweep's client counts, checked before Ray starts; [] without --sweep."""
    if args.sweep is None:
        return []
    try:
        levels = parse_levels(args.sweep)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    if args.level_seconds <= 0 or args.level_requests < 1 or args.warmup_seconds < 0 or args.timeout_s <= 0 \
            or args.overload_pairs < 0:
        raise SystemExit("--level-seconds and --timeout-s must be > 0, --level-requests >= 1, --warmup-seconds "
                         ">= 0, --overload-pairs >= 0")
    if not args.json:
        raise SystemExit("--sweep needs --json (the report; the plot goes next to it unless --plot says where)")
    return levels


def _print(report: dict[str, Any]) -> None:
    print(f"{report['requests']} requests at concurrency {report['concurrency']} (loopback)")
    for r in report["runs"]:
        lat = r["latency_ms"]
        print(f"{r['label']:>8} ({r['layers']} layers): {r['requests_per_s']:8.1f} req/s  p50 {lat['p50']:7.1f} ms"
              f"  p95 {lat['p95']:7.1f} ms  p99 {lat['p99']:7.1f} ms  errors {r['errors']}"
              f"  mean batch {r['batching']['mean_batch_size']:.1f}"
              f"  model {100 * r['model_time']['share_of_latency']:.0f}% of a request's time")
    pair = report.get("compact_vs_teacher")
    if pair and pair["status"] == "disturbed":
        guard = report["guard"]
        print(f"compact/teacher: DISTURBED, not a result (load average {guard['load_avg_start'][0]:.1f} -> "
              f"{guard['load_avg_end'][0]:.1f}; requests per attempt "
              f"{', '.join(str(a['rounds']) for a in guard['attempts'])}): " + "; ".join(pair["disturbed_because"]))
    elif pair:
        lo, hi = pair["p50_latency_ratio_ci95"]
        print(f"compact/teacher throughput: {pair['throughput_ratio']:.2f}x; p50 latency ratio "
              f"{pair['p50_latency_ratio']:.2f}x [{lo:.2f}, {hi:.2f}]")


if __name__ == "__main__":
    sys.exit(main())
