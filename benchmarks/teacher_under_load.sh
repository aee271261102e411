#!/usr/bin/env bash
# Does the default teacher depend on the machine's load? Train it twice with the same seed, once as the
# machine is and once beside two CPU-bound processes, and compare the weights and the test metrics.
#
#   benchmarks/teacher_under_load.sh [OUT]        # OUT defaults to runs/teacher-under-load
#
# Each run is `layerwise run` with its own run_dir, stopped (Ctrl-C) as soon as the teacher's test
# evaluation is done; the teacher stage's key is the same, so both train exactly the default teacher.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/teacher-under-load}
mkdir -p "$OUT"

one_run() {  # one_run NAME [hog]
    local dir="$OUT/$1" hogs=()
    rm -rf "$dir"
    if [ "${2:-}" = hog ]; then
        for _ in 1 2; do python3 -c "while True: pass" & hogs+=($!); done
    fi
    echo "$1: start, load average $(cut -d' ' -f1-3 /proc/loadavg)"
    setsid .venv/bin/layerwise run run_dir="$dir" > "$dir.log" 2>&1 &
    local pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        if compgen -G "$dir/default/evaluate-teacher-*/_DONE" > /dev/null; then kill -INT -- "-$pid"; break; fi
        sleep 5
    done
    wait "$pid"
    [ ${#hogs[@]} -gt 0 ] && kill "${hogs[@]}"
    echo "$1: end, load average $(cut -d' ' -f1-3 /proc/loadavg)"
}

one_run quiet
one_run hog hog
.venv/bin/python - "$OUT" <<'PY'
import hashlib, json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = {}
for name in ("quiet", "hog"):
    root = out / name / "default"
    (teacher,) = root.glob("teacher-*")
    (evaluation,) = root.glob("evaluate-teacher-*")
    weights = b"".join(p.read_bytes() for p in sorted((teacher / "model").glob("*.safetensors")))
    means = json.loads((evaluation / "teacher.json").read_text())["means"]
    rows[name] = {"teacher_stage": teacher.name, "seconds": json.loads((teacher / "_seconds.json").read_text()),
                  "weights_sha256": hashlib.sha256(weights).hexdigest(),
                  **{k: means[k] for k in ("ndcg@10", "hr@10", "mrr")}}
    print(name, json.dumps(rows[name]))
same = rows["quiet"]["weights_sha256"] == rows["hog"]["weights_sha256"]
print("identical teacher weights:", same)
(out / "summary.json").write_text(json.dumps({"runs": rows, "identical": same}, indent=1))
sys.exit(0 if same else 1)
PY
