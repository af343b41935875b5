#!/usr/bin/env bash
# Quick start, command 1: set up (once), prepare the model (once), serve it with vLLM.
#
#   bash scripts/serve.sh [extra `vllm serve` flags...]
#
# OpenAI-compatible API on http://$HOST:$PORT/v1 (default 127.0.0.1:8000).
# Env: HOST, PORT, MIKV_POLICY (default mikv), MIKV_DTYPE (default float32),
#      MIKV_ENFORCE_EAGER (default 1: ~40 s start on 2 CPU cores instead of ~200 s
#      of torch.compile), MIKV_GPU_MEM (default 0.5), VENV, MIKV_VLLM_CACHE.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
export VENV
bash "$ROOT/scripts/setup.sh"

export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
MIKV="$VENV/bin/mikv-vllm"

MODEL_DIR="$("$MIKV" prepare-model)"

args=(serve "$MODEL_DIR"
      --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}"
      --dtype "${MIKV_DTYPE:-float32}"
      --gpu-memory-utilization "${MIKV_GPU_MEM:-0.5}")
if [[ "${MIKV_ENFORCE_EAGER:-1}" == 1 ]]; then
    args+=(--enforce-eager)
fi

# The MiKV flags exist once the plugin registers them; otherwise serve stock vLLM.
help_text="$("$MIKV" serve --help=all 2>&1 || true)"
if grep -q -e '--kv-cache-policy' <<<"$help_text"; then
    args+=(--kv-cache-policy "${MIKV_POLICY:-mikv}")
    echo "[serve] MiKV KV cache: --kv-cache-policy ${MIKV_POLICY:-mikv}" >&2
else
    echo "[serve] note: this build has no --kv-cache-policy flag; serving stock vLLM (no MiKV)" >&2
fi

echo "[serve] $MIKV ${args[*]} $*" >&2
exec "$MIKV" "${args[@]}" "$@"
