#!/usr/bin/env bash
# The kvpress leaderboard's protocol in one command: RULER at 4K tokens, the context compressed without the question,
# every method at every compression ratio and the full cache once; then scores, the table, the leaderboard's columns
# (OUT/leaderboard.csv and .md: dataset, data_dir, model, method, compression_ratio, score) and the plot of RULER's
# score versus compression ratio, one line per method, the full cache dashed (OUT/leaderboard.png).
# Resumable: re-running the same command skips finished samples. OUT is output_dir (default results/leaderboard).
#   usage: scripts/leaderboard.sh METHODS [KEY=VALUE ...]
#     METHODS   comma-separated method names (evalkv list methods), e.g. full,snapkv,streaming_llm,knorm
#     KEY=VALUE any evalkv pred override. task.essay_path= is needed by RULER's five essay-haystack tasks
#               (evalkv data ruler --dest data/ruler fetches the essays); task.squad_path= and task.hotpotqa_path=
#               add qa_1 and qa_2, the leaderboard's 13 tasks (without them: 11)
#   env: MODEL    evalkv model config (default llama3.1-8b-instruct; the leaderboard's other model is qwen3-8b)
#        RATIOS   comma-separated compression ratios (default 0.25,0.5,0.75,0.875; e.g. 0.1,0.25,0.5,0.75,0.875,0.9)
#        SAMPLES  samples per task (default: the task's, RULER's 500)
#        LENGTH   context length in tokens (default 4096, the leaderboard's)
#        TASKS    comma-separated RULER tasks (default: the 13 less those whose data are not given)
#        EVALKV   the command to run (default: evalkv), e.g. "python3 -m evalkv.cli"
#        PARALLEL N processes side by side, the methods dealt out in turn (default 1: one process); each method's
#                 runs then go under OUT/<method>/ (keep the setting when resuming); on one GPU, CUDA MPS
#                 (nvidia-cuda-mps-control -d) lets the processes share it (docs/results.md ran 21 that way)
#   example: scripts/leaderboard.sh full,snapkv,knorm task.essay_path=data/ruler/PaulGrahamEssays.json
set -euo pipefail
# The evalkv pred override that compresses the context without the question, as kvpress's evaluate.py does by
# default (query_aware: false) and its leaderboard runs. Set LEADERBOARD_QUERY_AGNOSTIC="" to compress with it.
QUERY_AGNOSTIC=${LEADERBOARD_QUERY_AGNOSTIC-compress=context}
# RULER's tasks, and those that hide their needles in the essays (evalkv/tasks/ruler/constants.py).
RULER_TASKS=niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multikey_2,niah_multikey_3,niah_multivalue
RULER_TASKS+=,niah_multiquery,vt,cwe,fwe,qa_1,qa_2
ESSAY_TASKS=niah_single_2,niah_single_3,niah_multikey_1,niah_multivalue,niah_multiquery
source "$(dirname "${BASH_SOURCE[0]}")/sweep_lib.sh"
if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
  usage_from_header "$0"
  [[ $# -ge 1 && ($1 == -h || $1 == --help) ]] && exit 0 || exit 2
fi
evalkv=${EVALKV:-evalkv}
methods=$1
shift
model=${MODEL:-llama3.1-8b-instruct} ratios=${RATIOS:-0.25,0.5,0.75,0.875} length=${LENGTH:-4096}
output_dir=results/leaderboard parallel=${PARALLEL:-1}
if ! [[ $parallel =~ ^[1-9][0-9]*$ ]]; then
  echo "leaderboard: PARALLEL must be a positive number of processes, got '$parallel'" >&2
  exit 2
fi
declare -A given=()
declare -a passed=()  # the overrides given, output_dir= left out (every call gets its own below)
for arg in "$@"; do
  given[${arg%%=*}]=1
  if [[ $arg == output_dir=* ]]; then output_dir=${arg#output_dir=}; else passed+=("$arg"); fi
done
tasks=${TASKS:-}
if [[ -z $tasks ]]; then
  tasks=$RULER_TASKS
  [[ -n ${given[task.squad_path]:-} ]] || tasks=${tasks/,qa_1/}
  [[ -n ${given[task.hotpotqa_path]:-} ]] || tasks=${tasks/,qa_2/}
  [[ $tasks == "$RULER_TASKS" ]] || echo "leaderboard: qa_1 / qa_2 left out: give task.squad_path= and" \
    "task.hotpotqa_path= for the leaderboard's 13 tasks" >&2
fi
for task in ${tasks//,/ }; do
  if [[ ,$ESSAY_TASKS, == *,$task,* && -z ${given[task.essay_path]:-} ]]; then
    echo "leaderboard: RULER's $task reads Paul Graham's essays: give task.essay_path=FILE (evalkv data ruler" \
      "--dest data/ruler fetches them), or choose tasks with TASKS=" >&2
    exit 2
  fi
done
overrides=(task=ruler "model=$model" "task.lengths=[$length]" "task.tasks=[$tasks]" progress=false)
[[ -n ${SAMPLES:-} ]] && overrides+=("task.num_samples=$SAMPLES")
[[ -n $QUERY_AGNOSTIC ]] && overrides+=("$QUERY_AGNOSTIC")
status=0
# One multirun per process: the full cache ignores compression_ratio, so it runs once and its later jobs find it done.
if ((parallel == 1)); then
  $evalkv pred --multirun "method=$methods" "compression_ratio=$ratios" "${overrides[@]}" "${passed[@]}" \
    "output_dir=$output_dir" || status=$?
else
  IFS=, read -r -a method_list <<<"$methods"
  declare -a workers=()
  for ((part = 0; part < parallel && part < ${#method_list[@]}; part++)); do
    (  # this process's methods one after another; a failed one does not stop the next
      failed=0
      for ((i = part; i < ${#method_list[@]}; i += parallel)); do
        method=${method_list[i]}
        $evalkv pred --multirun "method=$method" "compression_ratio=$ratios" "${overrides[@]}" "${passed[@]}" \
          "output_dir=$output_dir/$method" || failed=1
      done
      exit "$failed"
    ) &
    workers+=("$!")
  done
  for worker in "${workers[@]}"; do wait "$worker" || status=1; done
fi
if [[ -d $output_dir ]]; then
  $evalkv score --quiet "$output_dir"
  $evalkv table "$output_dir"
  $evalkv table "$output_dir" --view leaderboard --format csv -o "$output_dir/leaderboard.csv" || status=$?
  $evalkv plot curves "$output_dir" --tasks RULER -o "$output_dir/leaderboard.png" \
    --title "RULER at $length tokens, $model: score versus compression ratio" || status=$?
  $evalkv table "$output_dir" --view leaderboard | tee "$output_dir/leaderboard.md" || status=$?
fi
exit "$status"
