#!/usr/bin/env bash
# The main job on the embedded default model, from a fresh machine: set up .venv, then passkey retrieval with
# Qwen2.5-Coder-0.5B-Instruct (GGUF), full cache vs SnapKV vs StreamingLLM at budget 128, scored and tabulated.
#   usage: bash scripts/demo.sh [evalkv demo options, e.g. --budget 64 --lengths 1024,2048]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh" model
cd "$repo"
step "running evalkv demo (the first run also assembles and de-quantises the embedded model, cached afterwards)"
evalkv demo "$@"
