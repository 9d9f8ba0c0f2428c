#!/usr/bin/env bash
# Sourced by demo.sh and test.sh: create .venv (once) and install evalkv with the given extras into it.
#   EVALKV_VENV   where the virtual environment lives (default: <repo>/.venv)
#   EVALKV_TORCH  the torch requirement installed first when no torch is importable (default: torch==2.13.0, the
#                 CPU build these machines carry; a plain "torch" would pull several GB of CUDA packages)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${EVALKV_VENV:-$repo/.venv}
extras=${1:-model}
# step: one line on stderr before each set-up step, so minutes of quiet pip have a reason
step() { echo "[evalkv setup] $*" >&2; }
if [[ ! -x $venv/bin/python ]]; then
  step "creating the virtual environment $venv"
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
step "updating pip"
python -m pip install -q --upgrade pip >&2
if ! python -c "import torch" 2>/dev/null; then
  step "installing ${EVALKV_TORCH:-torch==2.13.0} (no torch importable; a few minutes the first time)"
  python -m pip install -q "${EVALKV_TORCH:-torch==2.13.0}" >&2
fi
step "installing evalkv with the extras [$extras] (editable, from $repo)"
python -m pip install -q -e "$repo[$extras]" >&2

# install_chromium: Debian's chromium for the report page's browser test (tests/test_report_page.py), when it is
# missing and apt-get runs as root; best effort (about 40 s), never fatal: without it that one test skips.
install_chromium() {
  command -v chromium >/dev/null 2>&1 && return 0
  if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "note: no chromium and no root apt-get; the report page's browser test will skip" >&2
    return 0
  fi
  step "installing Debian's chromium for the report page's browser test (about 40 s)"
  { timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -qq chromium; } \
    >/dev/null 2>&1 || echo "note: could not install chromium; the report page's browser test will skip" >&2
}
