#!/usr/bin/env bash
# The test suite, from a fresh machine: set up .venv with the embedded model and the dev tools, lint, run pytest.
#   usage: bash scripts/test.sh [pytest options]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh" model,dev
cd "$repo"
ruff check evalkv tests
python -m pytest -q "$@"
