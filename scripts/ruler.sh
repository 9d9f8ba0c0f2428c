#!/usr/bin/env bash
# RULER sweep: every method x budget, then scores, the table and RULER's per-length view (evalkv table --view ruler).
# Resumable: re-running the same command skips finished samples.
#   usage: scripts/ruler.sh METHODS BUDGETS [KEY=VALUE ...]
#     METHODS   comma-separated method names (evalkv list methods); full runs once, without a budget
#     BUDGETS   comma-separated budgets, e.g. 128,256,512,1024
#     KEY=VALUE any evalkv pred override: task.lengths=[4096,8192], task.num_samples=, task.essay_path=, model=,
#               output_dir=, method.X=, ...
#   env: TASKS   comma-separated RULER tasks, one run each (e.g. niah_single_1,vt,cwe); default: one run of the
#                task config's tasks (the 11 synthetic ones)
#        EVALKV  the command to run (default: evalkv), e.g. "python3 -m evalkv.cli"
#   example: scripts/ruler.sh full,snapkv 128,1024 task.lengths=[4096,8192] output_dir=results/ruler
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/sweep_lib.sh"
if [[ $# -lt 2 || $1 == -h || $1 == --help ]]; then
  usage_from_header "$0"
  [[ $# -ge 1 && ($1 == -h || $1 == --help) ]] && exit 0 || exit 2
fi
status=0
sweep ruler "$@" || status=$?
if [[ -d $sweep_output_dir ]]; then
  ${EVALKV:-evalkv} table "$sweep_output_dir" --view ruler || status=$?
fi
exit "$status"
