#!/usr/bin/env bash
# Quick start, command 2: set up (once) and run the whole test suite.
#
#   bash scripts/test.sh [pytest args...]      (default: tests -q -ra --durations=25)
#
# The first run converts the embedded model (~1-2 min, cached in ~/.cache/mikv-vllm
# or $MIKV_VLLM_CACHE). pytest's "no tests collected" (exit 5) counts as a failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
export VENV
bash "$ROOT/scripts/setup.sh"

export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
cd "$ROOT"
if [[ $# -eq 0 ]]; then
    set -- tests -q -ra --durations=25
fi
rc=0
"$VENV/bin/python" -m pytest "$@" || rc=$?
if [[ $rc -eq 5 ]]; then
    echo "[test] error: pytest collected no tests (exit 5); treating as a failure" >&2
    exit 1
fi
exit $rc
