#!/usr/bin/env bash
# Quick start, command 1: set up (once), prepare the model (once), serve it with vLLM.
#
#   bash scripts/serve.sh [extra `vllm serve` flags...]
#
# OpenAI-compatible API on http://$HOST:$PORT/v1 (default 127.0.0.1:8000).
# Env: HOST, PORT, MIKV_POLICY (default mikv), MIKV_DTYPE (default float32),
#      MIKV_ENFORCE_EAGER (default 1: ~40 s start on 2 CPU cores instead of ~200 s
#      of torch.compile), MIKV_GPU_MEM (default 0.5), VENV, MIKV_VLLM_CACHE,
#      VLLM_PLUGINS (mikv is added: vLLM loads endpoint plugins, here /mikv/stats and the
#      mikv_* metrics, only when named there; general plugins not named there are skipped,
#      which here are only vLLM's LoRA resolvers, off unless configured).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
export VENV
bash "$ROOT/scripts/setup.sh"

export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
case ",${VLLM_PLUGINS:-}," in
    *,mikv,*) ;;
    *) export VLLM_PLUGINS="${VLLM_PLUGINS:+$VLLM_PLUGINS,}mikv" ;;
esac
MIKV="$VENV/bin/mikv-vllm"

MODEL_DIR="$("$MIKV" prepare-model)"

args=(serve "$MODEL_DIR"
      --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}"
      --dtype "${MIKV_DTYPE:-float32}"
      --gpu-memory-utilization "${MIKV_GPU_MEM:-0.5}")
if [[ "${MIKV_ENFORCE_EAGER:-1}" == 1 ]]; then
    args+=(--enforce-eager)
fi

# The MiKV flags exist once vLLM has loaded the plugin; without them there is nothing to serve.
help_text="$("$MIKV" serve --help=all 2>&1 || true)"
if ! grep -q -e '--kv-cache-policy' <<<"$help_text"; then
    tail -n 20 <<<"$help_text" >&2
    echo "[serve] error: vLLM did not load the mikv plugin (no --kv-cache-policy flag; VLLM_PLUGINS=$VLLM_PLUGINS);" \
         "see the output above" >&2
    exit 1
fi
args+=(--kv-cache-policy "${MIKV_POLICY:-mikv}")
echo "[serve] MiKV KV cache: --kv-cache-policy ${MIKV_POLICY:-mikv}; VLLM_PLUGINS=$VLLM_PLUGINS" >&2

echo "[serve] $MIKV ${args[*]} $*" >&2
exec "$MIKV" "${args[@]}" "$@"
