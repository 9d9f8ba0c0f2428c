#!/usr/bin/env bash
# The GPU measurements recorded in docs/results.md, one phase per call; every phase resumes where it stopped.
# Runs the project's own commands on the embedded model (EVALKV_EMBEDDED_GGUF points at the assembled file).
#   usage: scripts/measure_gpu.sh PHASE
#   phases: passkey, prepare, overhead, methods, needle, ruler, longbench, perf, tables; issue 21's owed runs:
#           reasoning, slots, overheads, long, catekv, gpu-tests
#   env: EVALKV (default: python3 -m evalkv.cli), MODEL (default: the embedded qwen2.5-coder-0.5b-instruct),
#        RESULTS (runs; default /root/results), OUT (tables; default RESULTS), ESSAYS (RULER's
#        PaulGrahamEssays.json), RULER_SAMPLES (samples per RULER task and length; default 50), LONGBENCH (folder of
#        the official task files), LONGBENCH_SAMPLES (samples per LongBench task; default 200, the whole file),
#        BATCH_SIZE (samples decoding together; default 16), PERF_MODEL (perf phase; default random-llama-3.1-8b),
#        SWEEP_METHODS / SWEEP_BUDGETS (ruler and longbench phases: a part of their sweep, e.g. to run parts as
#        parallel processes on one GPU), BUDGETS (methods phase; default "128 512"), METHOD_TASKS (methods phase;
#        default "passkey ruler"), SKIP_TABLES=1 (score and tabulate later, with the tables phase),
#        PRED_OVERRIDES (extra `evalkv pred` overrides for every run, space-separated, e.g. "decode_graphs=off"),
#        PROCESSES (data-parallel `evalkv pred` processes per run, all on one GPU: torchrun with
#        EVALKV_PROCESSES_PER_GPU; default 1, a plain process), KVPRESS_SITE (reasoning phase: a folder where
#        kvpress 0.5.5 and its transformers are installed, e.g. `pip install --target` of .device/kvpress_whl;
#        unset: the kvpress side is skipped), NEW_TOKENS (reasoning phase; default 2048), LENGTHS (long phase;
#        default 131072,262144), HEADMASK (long and catekv phases; default $root/headmask-8b-1m.csv)
set -euo pipefail
phase=${1:?usage: scripts/measure_gpu.sh PHASE}
root=${RESULTS:-/root/results}
out=${OUT:-$root}
evalkv=${EVALKV:-python3 -m evalkv.cli}
model=${MODEL:-qwen2.5-coder-0.5b-instruct}
mkdir -p "$root" "$out"

run() { echo "+ $*" >&2; "$@"; }
processes=${PROCESSES:-1}
launcher=($evalkv)
if (( processes > 1 )); then
  launcher=(env "EVALKV_PROCESSES_PER_GPU=$processes" torchrun --standalone --nproc-per-node "$processes" -m evalkv.cli)
fi
# shellcheck disable=SC2086  # PRED_OVERRIDES is a list of words
pred() { run "${launcher[@]}" pred "model=$model" progress=false "batch_size=${BATCH_SIZE:-16}" ${PRED_OVERRIDES:-} "$@"; }
tables() {  # scores of every run under a folder, then its tables into $out
  local dir=$1 name=$2; shift 2
  [[ -n ${SKIP_TABLES:-} ]] && return
  run $evalkv score --quiet "$dir"
  $evalkv table "$dir" > "$out/$name.md"
  for view in "$@"; do $evalkv table "$dir" --view "$view" > "$out/$name.$view.md"; done
}

# every method of the project; sink_recent_uniform, catekv and learned_mlp run apart (they need extra options)
METHODS=full,snapkv,pyramidkv,adakv,h2o,tova,streaming_llm,sliding_window,segment_two_stage,obcache,lacache,lru,knorm,kmeans

every_method() {  # every_method BUDGET TASK-OVERRIDES...: all methods at one budget
  local budget=$1; shift
  local small=$(( budget < 512 ))
  pred "$@" method=full  # once: the full cache has no budget (a finished run is skipped)
  pred --multirun "$@" "method=${METHODS#full,}" budget=$budget
  if (( small )); then
    pred "$@" method=sink_recent_uniform budget=$budget method.sink=32 method.recent=64
    pred "$@" method=catekv budget=$budget method.init_tokens=16 method.recent_tokens=64 \
      "method.headmask_path=$root/headmask.csv"
  else
    pred "$@" method=sink_recent_uniform budget=$budget method.sink=128 method.recent=256
    pred "$@" method=catekv budget=$budget "method.headmask_path=$root/headmask.csv"
  fi
  pred "$@" method=learned_mlp budget=$budget "method.policy_path=$root/policy.safetensors"
}

sweep() {  # sweep DEFAULT-METHODS DEFAULT-BUDGETS TASK-OVERRIDES...: full once, the others at every budget
  local methods=${SWEEP_METHODS:-$1} budgets=${SWEEP_BUDGETS:-$2}; shift 2
  local others=$(tr , '\n' <<< "$methods" | grep -vx full | paste -sd, -)
  if grep -qx full <<< "$(tr , '\n' <<< "$methods")"; then pred "$@" method=full; fi
  if [[ -n $others ]]; then pred --multirun "$@" "method=$others" "budget=$budgets"; fi
}

case $phase in
passkey)  # issue 3: passkey 4K-32K, depths 0-100%, full + four methods at budgets 128 and 1024
  task=(task=passkey "task.lengths=[4096,8192,16384,32768]" "task.depths=[0,20,40,60,80,100]"
        "output_dir=$root/passkey")
  pred "${task[@]}" method=full
  pred --multirun "${task[@]}" method=snapkv,streaming_llm,h2o,tova budget=128,1024
  tables "$root/passkey" passkey by_context_length by_depth timing
  ;;
prepare)  # catekv's headmask (RULER vt) and learned_mlp's policy (passkey prompts, seed 1729), made once
  [[ -f $root/headmask.csv ]] || run $evalkv headmask "model=$model" task=ruler "task.tasks=[vt]" "task.lengths=[16384]" \
    task.num_samples=8 --samples 8 -o "$root/headmask.csv"
  [[ -f $root/policy.safetensors ]] || run $evalkv train-policy "model=$model" task=passkey "task.lengths=[4096,8192]" \
    "task.depths=[5,35,65,95]" --steps 16 --top 128 -o "$root/policy.safetensors"
  ;;
overhead)  # issue 6: each method's eviction overhead as a fraction of the full cache's prefill time at 32K
  run $evalkv bench "model=$model" budget=512 "method=$METHODS,sink_recent_uniform,catekv,learned_mlp" \
    sink_recent_uniform.sink=128 sink_recent_uniform.recent=256 \
    "catekv.headmask_path=$root/headmask.csv" "learned_mlp.policy_path=$root/policy.safetensors" \
    --lengths 32768 --new-tokens 8 --repeats 3 -o "$out/overhead.json" > "$out/overhead.md"
  ;;
methods)  # issue 6: every method at budgets 128 and 512: passkey 8K-32K, RULER niah_single_2 + niah_multikey_1
  for budget in ${BUDGETS:-128 512}; do
    for method_task in ${METHOD_TASKS:-passkey ruler}; do
      if [[ $method_task == passkey ]]; then
        every_method $budget task=passkey "task.lengths=[8192,16384,32768]" "task.depths=[10,50,90]" \
          "output_dir=$root/methods"
      else
        every_method $budget task=ruler "task.tasks=[niah_single_2,niah_multikey_1]" "task.lengths=[8192,16384]" \
          task.num_samples=3 "task.essay_path=$ESSAYS" "output_dir=$root/methods"
      fi
    done
  done
  tables "$root/methods" methods by_context_length timing
  ;;
needle)  # issue 5: needle heatmaps up to 32K for full and snapkv@256 (the KV-cache papers' form)
  grid=(task=needle "task.haystack_path=$ESSAYS" "task.lengths=[2048,4096,8192,16384,32000]"
        "output_dir=$root/needle")
  pred "${grid[@]}" method=full
  pred "${grid[@]}" method=snapkv budget=256
  for run_dir in "$root"/needle/*/*/*/; do
    name=$(basename "$run_dir")
    run $evalkv plot needle "$run_dir" -o "$out/needle_$name.png" --title "Qwen2.5-Coder-0.5B-Instruct, $name"
  done
  tables "$root/needle" needle by_context_length
  ;;
ruler)  # issue 5: RULER 4K/8K/16K (11 tasks) for full, snapkv, streaming_llm, h2o at budgets 256 and 1024
  spec=(task=ruler "task.essay_path=$ESSAYS" "task.lengths=[4096,8192,16384]"
        task.num_samples=${RULER_SAMPLES:-50} "output_dir=$root/ruler")
  sweep full,snapkv,streaming_llm,h2o 256,1024 "${spec[@]}"
  tables "$root/ruler" ruler by_context_length timing
  ;;
longbench)  # issue 4: the three official task files for full, snapkv, streaming_llm, h2o, tova at 128/512/2048
  spec=(task=longbench "task.data_dir=$LONGBENCH" "task.tasks=[multi_news,multifieldqa_zh,passage_retrieval_zh]"
        task.samples_per_task=${LONGBENCH_SAMPLES:-200} "output_dir=$root/longbench")
  sweep full,snapkv,streaming_llm,h2o,tova 128,512,2048 "${spec[@]}"
  tables "$root/longbench" longbench timing
  ;;
perf)  # issue 8: batched decoding vs the HBM bound; a 128K-token prefill, full cache vs snapkv@2048 + chunked MLP
  perf_model=${PERF_MODEL:-random-llama-3.1-8b}
  run $evalkv bench --model "$perf_model" --methods snapkv --budget 2048 --lengths 8192 --batch-sizes 1,16 \
    --new-tokens 64 --repeats 2 -o "$out/perf_batch.json" > "$out/perf_batch.md"
  run $evalkv bench --model "$perf_model" --methods snapkv --budget 2048 --lengths 131072 --new-tokens 8 \
    --repeats 1 --warmup 0 --mlp-chunk 16384 -o "$out/perf_128k_snapkv.json" > "$out/perf_128k_snapkv.md"
  run $evalkv bench --model "$perf_model" --methods full --lengths 131072 --new-tokens 8 --repeats 1 --warmup 0 \
    -o "$out/perf_128k_full.json" > "$out/perf_128k_full.md" || echo "full-cache 128K prefill failed" >&2
  ;;
reasoning)  # issue 21 goal 4: 64 prompts of 100-1000 tokens, NEW_TOKENS each, budget 1024, all 64 in one batch:
  # the full cache, h2o (slot-cache graphs) and decoding snapkv (graphed segments between cuts); then kvpress's
  # DecodingPress(SnapKVPress) on the first sample of the same workload (it decodes one sample at a time)
  run $evalkv bench --workload reasoning model=random-llama-3.1-8b method=full,h2o,snapkv snapkv.decode_interval=128 \
    budget=1024 --samples 64 --new-tokens "${NEW_TOKENS:-2048}" --batch-size 64 --write-workload "$root/reasoning64.json" \
    -o "$out/reasoning64.json" > "$out/reasoning64.md"
  if [[ -n ${KVPRESS_SITE:-} ]]; then
    run env PYTHONPATH="$KVPRESS_SITE" python3 scripts/kvpress_bench.py "$root/reasoning64.json" --press decoding-snapkv \
      --samples 1 -o "$out/reasoning64-kvpress.json" > "$out/reasoning64-kvpress.log" 2>&1
  fi
  ;;
slots)  # issue 21 goal 2: the slot-cache step compiled (h2o, streaming_llm; snapkv for reference), batch 16, 8K
  run $evalkv bench model=random-llama-3.1-8b method=h2o,streaming_llm,snapkv budget=1024 --lengths 8192 \
    --batch-sizes 16 --new-tokens 512 --repeats 1 --decode-graphs auto,compile -o "$out/slots-compile.json" \
    > "$out/slots-compile.md"
  ;;
overheads)  # issue 21 goals 1 and 6, issue 19: 32K prefill overheads after the per-chunk and norm fixes, kmeans'
  # fused assignment and the scoring methods' first pass from flash attention
  run $evalkv bench model=random-llama-3.1-8b method=full,h2o,lru,kvcV_fullhist,kmeans,sink_recent_uniform \
    budget=1024 --lengths 32768 --new-tokens 8 --repeats 3 -o "$out/overheads-32k.json" > "$out/overheads-32k.md"
  run $evalkv bench model=random-llama-3.1-8b method=full,snapkv snapkv.critical=true budget=1024 --lengths 32768 \
    --new-tokens 8 --repeats 3 -o "$out/criticalkv-32k.json" > "$out/criticalkv-32k.md"
  run $evalkv bench model=random-llama-3.1-8b method=full full.prefill_chunk=512 --lengths 32768 --new-tokens 8 \
    --repeats 3 -o "$out/full-chunked-32k.json" > "$out/full-chunked-32k.md"
  ;;
long)  # issue 21 goal 5: catekv, snapkv, full at 128K and 256K on Llama-3-8B with Gradient-1048k's RoPE (a cell
  # that runs out of memory is listed under the table); the headmask from RULER niah_single_1 at 8K (RULER's vt
  # needs a word tokenizer: its in-context example exceeds 500 tokens with the random models' byte tokenizer)
  headmask=${HEADMASK:-$root/headmask-8b-1m.csv}
  if [[ ! -s $headmask ]]; then
    run $evalkv headmask model=random-llama-3-8b-1m "task.tasks=[niah_single_1]" "task.lengths=[8192]" --samples 4 \
      -o "$headmask"
  fi
  run $evalkv bench model=random-llama-3-8b-1m method=catekv,snapkv,full budget=2048 "catekv.headmask_path=$headmask" \
    --lengths "${LENGTHS:-131072,262144}" --new-tokens 64 --repeats 1 --warmup 0 --mlp-chunk 16384 \
    -o "$out/long-context.json" > "$out/long-context.md"
  ;;
catekv)  # issue 21 goal 3: catekv in a batch of 16 (8K, budget 1024), then snapkv at catekv's mean kept entries
  headmask=${HEADMASK:-$root/headmask-8b-1m.csv}
  run $evalkv bench model=random-llama-3-8b-1m method=catekv budget=1024 "catekv.headmask_path=$headmask" \
    --lengths 8192 --batch-sizes 16 --new-tokens 256 --repeats 1 -o "$out/catekv-b16.json" > "$out/catekv-b16.md"
  kept=$(python3 -c "import json, sys; print(round(json.load(open(sys.argv[1]))['rows'][0]['kept_tokens']))" \
    "$out/catekv-b16.json")
  run $evalkv bench model=random-llama-3-8b-1m method=snapkv "budget=$kept" --lengths 8192 --batch-sizes 16 \
    --new-tokens 256 --repeats 1 -o "$out/catekv-b16-snapkv.json" > "$out/catekv-b16-snapkv.md"
  ;;
gpu-tests)  # the tests marked for CUDA (graph replays, the segment and slot decoders, the scoring kernels)
  run python3 -m pytest -q -p no:cacheprovider tests/test_decode_graphs.py tests/test_cuda.py \
    tests/test_scoring_kernels.py tests/test_cluster_kernels.py tests/test_decode_kernels.py tests/test_sampling.py \
    tests/test_think.py \
    -k "cuda or CUDA or kernel" \
    > "$out/gpu-tests.log" 2>&1 || echo "GPU tests failed: $out/gpu-tests.log" >&2
  ;;
tables)  # scores and tables of every folder the other phases fill (after parallel runs with SKIP_TABLES=1)
  unset SKIP_TABLES
  if [[ -d $root/passkey ]]; then tables "$root/passkey" passkey by_context_length by_depth timing; fi
  if [[ -d $root/methods ]]; then tables "$root/methods" methods by_context_length timing; fi
  if [[ -d $root/needle ]]; then tables "$root/needle" needle by_context_length; fi
  if [[ -d $root/ruler ]]; then tables "$root/ruler" ruler by_context_length timing; fi
  if [[ -d $root/longbench ]]; then tables "$root/longbench" longbench timing; fi
  ;;
*)
  echo "unknown phase $phase; phases: passkey, prepare, overhead, methods, needle, ruler, longbench, perf, tables," \
    "reasoning, slots, overheads, long, catekv, gpu-tests" >&2
  exit 2
  ;;
esac
