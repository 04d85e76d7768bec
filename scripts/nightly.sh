#!/usr/bin/env bash
# The nightly memory job (what .github/workflows/nightly-gpu.yml runs, after `make setup`):
# measure each listed scenario, put its table in the job summary, compare it with the newest
# baseline run of that scenario, and exit 1 if any run failed or any comparison found a
# regression (+) or a newly failing variant (!). Settings, from the environment:
#   NIGHTLY_SCENARIOS   the list, one scenario per line, # comments (.github/nightly-scenarios.txt)
#   NIGHTLY_DEVICE      cuda (default) | simulate | cpu
#   NIGHTLY_OUT         where the runs go (results/_nightly)
#   NIGHTLY_BASELINE    baselines, a folder of runs per scenario (results/nightly-baseline)
#   NIGHTLY_FAIL_ABOVE  harness compare's threshold (1%)
#   NIGHTLY_METRIC      what is gated, one or more record fields separated by spaces
#                       (peak_allocated_bytes; e.g. "peak_allocated_bytes peak_reserved_bytes")
#   GITHUB_STEP_SUMMARY the job summary (markdown); standard output when unset
set -uo pipefail
cd "$(dirname "$0")/.."
harness=.venv/bin/harness
list=${NIGHTLY_SCENARIOS:-.github/nightly-scenarios.txt}
device=${NIGHTLY_DEVICE:-cuda}
out=${NIGHTLY_OUT:-results/_nightly}
baseline=${NIGHTLY_BASELINE:-results/nightly-baseline}
fail_above=${NIGHTLY_FAIL_ABOVE:-1%}
metrics=${NIGHTLY_METRIC:-peak_allocated_bytes}
summary=${GITHUB_STEP_SUMMARY:-/dev/stdout}
mkdir -p "$out"
status=0
while read -r scenario _; do
  [[ -z "$scenario" || "$scenario" == \#* ]] && continue
  name=$(basename "$scenario" .yaml)
  if ! "$harness" run "$scenario" --device "$device" --out "$out" > "$out/$name.run.log" \
      2> "$out/$name.progress.log"; then
    echo "## $name: the run failed (see $name.progress.log)" >> "$summary"
    status=1
    continue
  fi
  run_dir=$(tail -n 1 "$out/$name.run.log" |
    .venv/bin/python -c 'import json, sys; print(json.load(sys.stdin)["run_dir"])')
  # The table without its picture links: the job summary has no run folder to show them from.
  { echo "## $name"; echo; grep -v '^!\[' "$run_dir/summary.md"; echo; } >> "$summary"
  if [[ -d "$baseline/$name" ]]; then
    for metric in $metrics; do
      "$harness" compare "$baseline/$name" "$run_dir" --metric "$metric" \
        --fail-above "$fail_above" > "$out/$name.$metric.compare.log" 2>&1
      code=$?
      # The table (the last line is JSON for scripts); exit 2 (incomparable input) fails too.
      { head -n -1 "$out/$name.$metric.compare.log"; echo; } >> "$summary"
      (( code == 0 )) || status=1
    done
  else
    echo "No baseline for $name: copy a run folder into $baseline/$name/ to gate it." >> "$summary"
  fi
done < "$list"
exit "$status"
