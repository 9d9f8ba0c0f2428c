#!/usr/bin/env bash
# Sourced by longbench.sh, ruler.sh and needle.sh: one `evalkv pred` per method x budget (x task when TASKS is set),
# then `evalkv score` of every run and `evalkv table` of the output folder.
# The full cache runs once, without a budget. A run that fails is reported at the end and the sweep goes on with the
# others; re-running the same command resumes every run where it stopped (finished samples are skipped).

# usage_from_header FILE: print the FILE's header comment (from line 2 to the first line that is not a comment).
usage_from_header() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$1"
}

# sweep TASK METHODS BUDGETS [KEY=VALUE ...]; sets sweep_runs (run directories) and sweep_output_dir.
sweep() {
  local task=$1 methods=$2 budgets=$3
  shift 3
  local evalkv=${EVALKV:-evalkv} method budget subtask run
  sweep_output_dir=results
  for arg in "$@"; do [[ $arg == output_dir=* ]] && sweep_output_dir=${arg#output_dir=}; done
  local -a subtasks=("") failed=() budget_list
  [[ -n ${TASKS:-} ]] && IFS=, read -r -a subtasks <<<"$TASKS"
  sweep_runs=()
  for method in ${methods//,/ }; do
    if [[ $method == full ]]; then budget_list=(""); else IFS=, read -r -a budget_list <<<"$budgets"; fi
    for budget in "${budget_list[@]}"; do
      for subtask in "${subtasks[@]}"; do
        local -a overrides=("task=$task" "method=$method" progress=false)
        [[ -n $budget ]] && overrides+=("budget=$budget")
        [[ -n $subtask ]] && overrides+=("task.tasks=[$subtask]")
        echo "evalkv pred ${overrides[*]} $*" >&2
        if run=$($evalkv pred "${overrides[@]}" "$@" | tail -n 1) && [[ -d $run ]]; then
          sweep_runs+=("$run")
        else
          failed+=("${overrides[*]} $*")
        fi
      done
    done
  done
  if [[ ${#sweep_runs[@]} -gt 0 ]]; then
    $evalkv score --quiet "${sweep_runs[@]}"
  fi
  if [[ -d $sweep_output_dir ]]; then
    $evalkv table "$sweep_output_dir"
  fi
  if [[ ${#failed[@]} -gt 0 ]]; then
    printf 'failed (fix and re-run the same command to resume):\n' >&2
    printf '  evalkv pred %s\n' "${failed[@]}" >&2
    return 1
  fi
}
