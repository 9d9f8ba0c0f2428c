#!/usr/bin/env bash
# Needle-in-a-haystack sweep: every method x budget, then scores, the table, and one heatmap per run
# (<run>/needle.png) plus all of them stacked (<output_dir>/needle.png).
# Resumable: re-running the same command skips finished samples.
#   usage: scripts/needle.sh METHODS BUDGETS [KEY=VALUE ...]
#     METHODS   comma-separated method names (evalkv list methods); full runs once, without a budget
#     BUDGETS   comma-separated budgets, e.g. 128,1024
#     KEY=VALUE any evalkv pred override: task.lengths=[...], task.depths=[...], model=, output_dir=, ...
#   env: EVALKV  the command to run (default: evalkv), e.g. "python3 -m evalkv.cli"
#   example: scripts/needle.sh full,snapkv,streaming_llm 128 task.lengths=[1024,2048] output_dir=results/needle
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/sweep_lib.sh"
if [[ $# -lt 2 || $1 == -h || $1 == --help ]]; then
  usage_from_header "$0"
  [[ $# -ge 1 && ($1 == -h || $1 == --help) ]] && exit 0 || exit 2
fi
status=0
sweep needle "$@" || status=$?
for run in "${sweep_runs[@]}"; do
  ${EVALKV:-evalkv} plot needle "$run" -o "$run/needle.png" >/dev/null
done
if [[ ${#sweep_runs[@]} -gt 0 ]]; then
  ${EVALKV:-evalkv} plot needle "${sweep_runs[@]}" -o "$sweep_output_dir/needle.png"
fi
exit "$status"
