#!/usr/bin/env bash
# One short GPU check for a lent GPU machine; at most 9 minutes, about 3-8 on one H200.
#   bash benchmarks/gpu_check.sh            # writes $OUT/gpu_check.json ($OUT unset: runs/gpu_check/)
# Uses $PYTHON, else .venv/bin/python, else python3: it needs torch (a CUDA build), transformers and
# deepspeed already installed (a lent machine reaches no package index). Without a GPU it exits with
# status 2 at once and says why. See benchmarks/gpu_check.py for what it measures.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
# 540 s: the harness allows 10 minutes a command; a run that hangs (NCCL, a stuck kernel) still ends
# in time to leave the parts that finished in the JSON.
exec timeout 540 "$PY" benchmarks/gpu_check.py "$@"
