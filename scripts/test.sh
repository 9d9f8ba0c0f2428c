#!/usr/bin/env bash
# The test suite, from a fresh machine: set up .venv with the embedded model, the dev tools, the SLURM launcher
# plugin (its config's composition is tested) and lm-eval (the `evalkv` model of lm-evaluation-harness is tested; it
# brings `datasets`, which task=perplexity reads local data folders with; about 40 s to install), install chromium
# where apt-get runs as root (the report page's browser test; EVALKV_NO_CHROMIUM=1 skips that step), lint, run pytest.
#   usage: bash scripts/test.sh [pytest options]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh" model,dev,slurm,lm_eval
[[ -n ${EVALKV_NO_CHROMIUM:-} ]] || install_chromium
cd "$repo"
# kvpress's own environment for tests/test_kvpress_reference.py (cached; without a registry that module skips)
step "kvpress 0.5.5's reference environment (once, about 30 s; scripts/kvpress_env.py)"
python scripts/kvpress_env.py >/dev/null || echo "note: kvpress's environment could not be built; its comparison tests will skip" >&2
step "ruff check"
ruff check evalkv tests
step "pytest, one worker per core (the first run also assembles and de-quantises the embedded model, cached afterwards)"
# One torch thread per worker and per process the tests start: more threads than cores only spin.
OMP_NUM_THREADS=1 python -m pytest -q -n auto --dist worksteal "$@"
