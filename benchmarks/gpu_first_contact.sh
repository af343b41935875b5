#!/usr/bin/env bash
# First GPU contact: kernel numerics (bf16, head_dim 128, block 16), workspace bound, decode timing
# vs fp16 SDPA at 4k-32k, and (where vLLM + the plugin are installed) vllm serve eager + CUDA graphs.
# One command, < 8 minutes, prints a short Markdown report. See benchmarks/gpu_first_contact.py.
#   bash benchmarks/gpu_first_contact.sh [--out DIR] [--model PATH] [--budget-s 450] [--dry-run]
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_first_contact.py" "$@"
