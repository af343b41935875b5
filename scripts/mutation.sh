#!/usr/bin/env bash
# Named-mutation check of MiKV's semantics (see scripts/mutation.py); not part of CI.
#   bash scripts/mutation.sh [--only NAME ...] [--list]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
export VENV
bash "$ROOT/scripts/setup.sh"
exec "$VENV/bin/python" "$ROOT/scripts/mutation.py" "$@"
