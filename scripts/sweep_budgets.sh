#!/usr/bin/env bash
# Sweep methods x budgets on one task with `evalkv pred --multirun` (the full cache runs once, without a budget),
# then score every run and print the table. A failing job does not stop the others; the exit status says it failed.
# Resumable: re-running the same command skips finished samples.
#   usage: scripts/sweep_budgets.sh METHODS BUDGETS [KEY=VALUE ...]
#     METHODS  comma-separated method names (evalkv list methods), e.g. full,snapkv,h2o,tova
#     BUDGETS  comma-separated budgets, e.g. 128,256,512,1024
#     KEY=VALUE any evalkv pred override (task=, model=, output_dir=, task.X=, method.X=, ...)
#   env: EVALKV (default: evalkv) the command to run, e.g. "python3 -m evalkv.cli"
#   example: scripts/sweep_budgets.sh full,snapkv,streaming_llm 128,1024 task.lengths=[4096] output_dir=results/sweep
set -euo pipefail
if [[ $# -lt 2 || $1 == -h || $1 == --help ]]; then
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
  [[ $# -ge 1 && ($1 == -h || $1 == --help) ]] && exit 0 || exit 2
fi
evalkv=${EVALKV:-evalkv}
methods=$1 budgets=$2
shift 2
output_dir=results
for arg in "$@"; do [[ $arg == output_dir=* ]] && output_dir=${arg#output_dir=}; done
budgeted=$(tr ',' '\n' <<<"$methods" | grep -vx full | paste -sd, -) || true
status=0
if [[ ,$methods, == *,full,* ]]; then
  $evalkv pred method=full progress=false "$@" || status=$?
fi
if [[ -n $budgeted ]]; then
  $evalkv pred --multirun "method=$budgeted" "budget=$budgets" progress=false "$@" || status=$?
fi
if [[ -d $output_dir ]]; then
  $evalkv score --quiet "$output_dir"
  $evalkv table "$output_dir"
fi
exit "$status"
