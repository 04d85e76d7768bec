#!/usr/bin/env bash
# Download, on a machine with the package registry, the wheels a bare GPU machine needs for the
# GPU check (scripts/gpu_check.sh) and lacks: Python 3.12, manylinux x86_64. Usage:
#   scripts/gpu_wheels.sh [DIR]        (default .gpu_wheels/, git-ignored)
# The versions are this checkout's tested ones (what .venv has, else the pins below). The
# folder travels with the checkout, whose whole must stay under BUDGET_MIB (default 58): wheels
# are added in order of need — bitsandbytes, Liger, the harness's own small dependencies, then
# TRL and what it imports (datasets pulls in pyarrow, ~40 MiB) — and one that would pass the
# budget is left out and named. The last line is the folder's size.
set -uo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.gpu_wheels}
budget_mib=${BUDGET_MIB:-58}
python=${PYTHON:-.venv/bin/python}
[[ -x "$python" ]] || python=python3
mkdir -p "$dir"

version() {  # the tested version of package $1, else $2
  "$python" -c "from importlib.metadata import version; print(version('$1'))" 2>/dev/null || echo "$2"
}

# In order of need: what each wheel is for is in docs/gpu.md.
wanted=(
  "bitsandbytes==$(version bitsandbytes 0.50.2)"
  "liger-kernel==$(version liger-kernel 0.8.5)"
  "pyyaml" "tabulate" "psutil" "hypothesis" "sortedcontainers" "attrs"
  "trl==$(version trl 1.16.0)"
  "datasets" "dill" "multiprocess" "xxhash" "rich" "markdown-it-py" "mdurl" "pygments"
  "pyarrow"
)

checkout_bytes=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -n 1 | cut -f 1)
left=$(( budget_mib * 1024 * 1024 - checkout_bytes - $(du -sb "$dir" | cut -f 1) ))
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for spec in "${wanted[@]}"; do
  rm -f "$tmp"/*
  if ! "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --abi cp312 --abi abi3 --abi none \
      --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_28_x86_64 --platform any --dest "$tmp" "$spec" 2> "$tmp.err"; then
    echo "left out $spec: not downloadable ($(tail -n 1 "$tmp.err"))"
    continue
  fi
  wheel=$(ls "$tmp"/*.whl)
  size=$(stat -c %s "$wheel")
  if [[ -e "$dir/$(basename "$wheel")" ]]; then
    echo "have     $(basename "$wheel")"
  elif (( size > left )); then
    echo "left out $(basename "$wheel"): $(( size / 1048576 )) MiB would pass the ${budget_mib} MiB budget"
  else
    mv "$wheel" "$dir/" && left=$(( left - size ))
    echo "added    $(basename "$wheel") ($(( size / 1024 )) KiB)"
  fi
done
rm -f "$tmp.err"
echo "$dir: $(du -sb "$dir" | cut -f 1) bytes in $(ls "$dir" | wc -l) wheels; checkout $checkout_bytes bytes; budget ${budget_mib} MiB"
