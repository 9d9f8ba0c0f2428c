#!/usr/bin/env bash
# LongBench sweep: every method x budget, then scores and the table (tasks grouped by LongBench's categories).
# Resumable: re-running the same command skips finished samples.
#   usage: scripts/longbench.sh METHODS BUDGETS [KEY=VALUE ...]
#     METHODS   comma-separated method names (evalkv list methods); full runs once, without a budget
#     BUDGETS   comma-separated budgets, e.g. 128,256,512,1024
#     KEY=VALUE any evalkv pred override: task.data_dir= (the unpacked data.zip, see evalkv data longbench),
#               model=, output_dir=, compress=context, task.n_samples=, method.X=, ...
#   env: TASKS   comma-separated LongBench tasks, one run each (e.g. hotpotqa,qasper,narrativeqa_e);
#                default: one run of the task config's tasks (the 16 English ones)
#        EVALKV  the command to run (default: evalkv), e.g. "python3 -m evalkv.cli"
#   example: scripts/longbench.sh full,snapkv,pyramidkv 128,512 task.data_dir=data/longbench output_dir=results/lb
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/sweep_lib.sh"
if [[ $# -lt 2 || $1 == -h || $1 == --help ]]; then
  usage_from_header "$0"
  [[ $# -ge 1 && ($1 == -h || $1 == --help) ]] && exit 0 || exit 2
fi
sweep longbench "$@"
