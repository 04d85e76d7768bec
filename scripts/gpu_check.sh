#!/usr/bin/env bash
# The GPU-readiness check: one command for a (bare) machine with a GPU, and what anyone renting
# one runs first. Usage:
#   scripts/gpu_check.sh OUT
# It installs the wheels carried in .gpu_wheels/ (scripts/gpu_wheels.sh) offline, with the
# machine's own Python, into OUT/site (nothing fetched, nothing else touched), then runs each
# step under its own time limit, none stopping the others:
#   1. what the machine has (torch, CUDA, GPU, which optional libraries import)
#   2. pytest -m gpu
#   3. the gpu_check scenario measured (every technique once on Llama-3.2-1B)
#   4. the first rows of qlora_mistral measured
#   5. compare-methods: the same variants estimated and simulated against step 3's measurement
#   6. a memory snapshot of one variant
# and writes every record, log and OUT/report.md (scripts/gpu_report.py). Without CUDA it says
# so and runs what it can: the installation into OUT/site, the scenario simulated. It stops
# itself before GPU_CHECK_DEADLINE seconds (default 470). Settings, from the environment:
#   GPU_CHECK_PYTHON    the interpreter (default: .venv/bin/python if present, else python3)
#   GPU_CHECK_WHEELS    the wheel folder (.gpu_wheels)
#   GPU_CHECK_SCENARIO  the scenario of steps 3, 5 and 6 (gpu_check)
#   GPU_CHECK_MISTRAL   the qlora_mistral variants of step 4, space-separated ("" skips it)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu_check.sh OUT}
mkdir -p "$out/logs" && out=$(cd "$out" && pwd)
python=${GPU_CHECK_PYTHON:-}
[[ -n "$python" ]] || { [[ -x .venv/bin/python ]] && python=.venv/bin/python || python=python3; }
wheels=${GPU_CHECK_WHEELS:-.gpu_wheels}
scenario=${GPU_CHECK_SCENARIO:-gpu_check}
mistral=${GPU_CHECK_MISTRAL-lora qlora qlora-gc}
deadline=${GPU_CHECK_DEADLINE:-470}
steps="$out/steps.tsv"
: > "$steps"
export PYTHONPATH="$out/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

# step NAME LIMIT COMMAND...: run it under min(LIMIT, what is left) seconds; log, status, time.
step() {
  local name=$1 limit=$2; shift 2
  local left=$(( deadline - SECONDS - 5 ))
  if (( left < 10 )); then
    printf '%s\tskipped\t0\tthe check'"'"'s deadline was reached\n' "$name" >> "$steps"
    return
  fi
  (( limit > left )) && limit=$left
  local start=$SECONDS
  timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" > "$out/logs/$name.log" 2>&1
  local code=$? status=ok
  (( code == 0 )) || status="failed (exit $code)"
  (( code == 124 || code == 137 )) && status="timed out after ${limit} s"
  local cmd="$*"
  cmd=${cmd//$'\n'/ }
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" $(( SECONDS - start )) "${cmd:0:160}" >> "$steps"
  echo "[$(( SECONDS ))s] $name: $status" >&2
}

install() {  # the carried wheels the machine lacks, offline, into OUT/site
  [[ -d "$wheels" ]] || { echo "no wheel folder $wheels (scripts/gpu_wheels.sh makes it)"; return 1; }
  if [[ "$device" != cuda ]]; then
    # No GPU: every wheel into a throwaway target, for the Python they were fetched for (3.12),
    # each then checked for its installed metadata; the runs below use this machine's own.
    "$python" -m pip install --no-index --no-deps --no-compile --only-binary=:all: \
      --python-version 3.12 --implementation cp --target "$out/throwaway" "$wheels"/*.whl ||
      return 1
    local wheel dist
    for wheel in "$wheels"/*.whl; do
      dist=$(basename "$wheel" | cut -d- -f1-2)
      ls -d "$out/throwaway/$dist".dist-info > /dev/null || { echo "not installed: $wheel"; return 1; }
    done
    echo "installed $(ls "$wheels"/*.whl | wc -l) wheels into $out/throwaway"
    return 0
  fi
  local missing
  missing=$("$python" - "$wheels" <<'PY'
import re, sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    dist = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
    try:
        version(dist)
        print(f"have {dist} {version(dist)}", file=sys.stderr)
    except PackageNotFoundError:
        print(wheel)
PY
  )
  [[ -z "$missing" ]] && { echo "nothing to install"; return 0; }
  # shellcheck disable=SC2086
  "$python" -m pip install --no-index --no-deps --no-compile --target "$out/site" $missing
}

cuda=$("$python" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [[ "$cuda" == 1 ]]; then device=cuda; else
  device=simulate
  echo "no CUDA device here: the check installs into a throwaway target and simulates" >&2
fi
export -f install
export out python wheels device
echo "$(basename "$scenario" .yaml)" > "$out/scenario"

step install 90 install
step machine 60 "$python" -c '
import importlib, json, platform, sys, torch
info = {"python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                total_bytes=p.total_memory)
from importlib.metadata import version
for name, dist in (("transformers",) * 2, ("peft",) * 2, ("accelerate",) * 2,
                   ("bitsandbytes",) * 2, ("liger_kernel", "liger-kernel"), ("trl",) * 2,
                   ("triton",) * 2, ("pandas",) * 2):
    try:
        importlib.import_module(name)
        info[name] = version(dist)
    except Exception as e:  # what cannot import is what the check will find unsupported
        info[name] = f"cannot import: {type(e).__name__}: {str(e)[:120]}"
open(sys.argv[1], "w").write(json.dumps(info, indent=1))
print(json.dumps(info, indent=1))' "$out/machine.json"
if [[ "$device" == cuda ]]; then
  step pytest-gpu 120 "$python" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
else
  printf 'pytest-gpu\tskipped\t0\tno CUDA device\n' >> "$steps"
fi
step scenario 200 "$python" -m harness run "$scenario" --device "$device" --out "$out/runs" \
  --timeout 120
if [[ -n "$mistral" ]]; then
  args=(); for v in $mistral; do args+=(--variant "$v"); done
  step qlora_mistral 120 "$python" -m harness run qlora_mistral --device "$device" \
    --steps 1 --out "$out/runs" --timeout 60 "${args[@]}"
fi
# The same variants estimated and simulated, beside the measurement (on CUDA) of each run.
compare() {  # compare-methods NAME SCENARIO [--variant V]...
  local name=$1 scenario=$2; shift 2
  local run
  run=$(ls -d "$out/runs/$(basename "$scenario" .yaml)"/*/ 2>/dev/null | head -n 1)
  local measured=()
  [[ "$device" == cuda && -n "$run" ]] && measured=(--measured "$run")
  step "$name" 150 "$python" -m harness compare-methods "$scenario" "${measured[@]}" \
    --out "$out/methods" "$@"
}
compare compare-methods "$scenario"
[[ -n "$mistral" ]] && compare compare-mistral qlora_mistral --steps 1 "${args[@]}"
first=$("$python" -c "import sys; from harness.scenario import load_scenario
print(load_scenario(sys.argv[1]).variants[0].name)" "$scenario" 2>/dev/null)
step snapshot 60 "$python" -m harness run "$scenario" --device "$device" --variant "$first" \
  --snapshot --out "$out/snapshot"
"$python" scripts/gpu_report.py "$out" && echo "report: $out/report.md" >&2
