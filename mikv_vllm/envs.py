"""Every environment switch mikv-vllm reads, each read here and nowhere else (docs/usage.md lists them).

Readers call the accessor (``envs.ops()``, ``envs.cpu_isa()``, ...) when they need the value, so a
change of the environment (tests' ``monkeypatch.setenv``) is seen by the next call. Bad values raise
``ValueError`` naming the switch. Standard library only: imported by the core-free glue and the CLI.
"""

from __future__ import annotations

import os
from pathlib import Path

OPS = "MIKV_VLLM_OPS"
WORKSPACE_MB = "MIKV_VLLM_WORKSPACE_MB"
CACHE = "MIKV_VLLM_CACHE"
CPU_ISA = "MIKV_CPU_ISA"
CPU_BUILD_DIR = "MIKV_CPU_BUILD_DIR"
CPU_BUILD_VERBOSE = "MIKV_CPU_BUILD_VERBOSE"
CPU_MALLOC = "MIKV_CPU_MALLOC"
STATS_LAYERS = "MIKV_STATS_LAYERS"
STATS_INTERVAL = "MIKV_STATS_INTERVAL"
CXX = "CXX"

OPS_CHOICES = ("auto", "torch", "triton", "cpu")
CPU_ISA_CHOICES = ("auto", "avx512", "avx2", "baseline")
STATS_LAYERS_CHOICES = ("first", "all", "off")
CPU_MALLOC_CHOICES = ("tcmalloc", "system")
DEFAULT_WORKSPACE_MB = 512
DEFAULT_STATS_INTERVAL = 5.0

# name -> (default as documented, meaning); docs/usage.md's table has one row per entry (tested)
SWITCHES: dict[str, tuple[str, str]] = {
    OPS: ("auto", "op set: auto (Triton on CUDA, the C++ op on CPU), torch, triton, cpu"),
    WORKSPACE_MB: (str(DEFAULT_WORKSPACE_MB), "Triton workspace budget (MiB)"),
    CACHE: ("~/.cache/mikv-vllm", "model cache of prepare-model"),
    CPU_ISA: ("auto", "C++ op variant: auto (best this CPU runs), avx512, avx2, baseline"),
    CPU_BUILD_DIR: ("~/.cache/mikv-vllm/torch_extensions", "C++ op builds made at engine start (fallback)"),
    CPU_BUILD_VERBOSE: ("0", "1: print the compiler commands of C++ op builds"),
    CPU_MALLOC: ("tcmalloc", "allocator of vLLM's CPU engine processes: tcmalloc (the system's, preloaded), system"),
    STATS_LAYERS: ("first", "layers counted by /mikv/stats: first, all, off"),
    STATS_INTERVAL: (str(DEFAULT_STATS_INTERVAL), "seconds between /mikv/stats polls of the workers"),
    CXX: ("c++", "C++ compiler of C++ op builds"),
}


def _choice(name: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(name, choices[0]).strip().lower() or choices[0]
    if value not in choices:
        raise ValueError(f"{name}={value!r}: must be one of {choices}")
    return value


def ops() -> str:
    """``MIKV_VLLM_OPS``: auto (default), torch, triton or cpu."""
    return _choice(OPS, OPS_CHOICES)


def workspace_mb() -> int:
    """``MIKV_VLLM_WORKSPACE_MB``: positive integer MiB (default 512)."""
    raw = os.environ.get(WORKSPACE_MB, str(DEFAULT_WORKSPACE_MB)).strip()
    try:
        mb = int(raw)
    except ValueError:
        mb = 0
    if mb <= 0:
        raise ValueError(f"{WORKSPACE_MB}={raw!r}: must be a positive integer (MiB)")
    return mb


def cache_dir() -> Path:
    """``$MIKV_VLLM_CACHE`` if set, else ``~/.cache/mikv-vllm``."""
    env = os.environ.get(CACHE)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mikv-vllm"


def cpu_isa() -> str:
    """``MIKV_CPU_ISA``: auto (default), avx512, avx2 or baseline."""
    return _choice(CPU_ISA, CPU_ISA_CHOICES)


def cpu_build_dir() -> Path:
    """``$MIKV_CPU_BUILD_DIR`` or ``~/.cache/mikv-vllm/torch_extensions``."""
    env = os.environ.get(CPU_BUILD_DIR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mikv-vllm" / "torch_extensions"


def cpu_build_verbose() -> bool:
    """``MIKV_CPU_BUILD_VERBOSE=1``: show the compiler commands."""
    return os.environ.get(CPU_BUILD_VERBOSE, "0").strip() == "1"


def cpu_malloc() -> str:
    """``MIKV_CPU_MALLOC``: tcmalloc (default) or system."""
    return _choice(CPU_MALLOC, CPU_MALLOC_CHOICES)


def cxx() -> str:
    """``$CXX`` (the usual compiler switch), default ``c++``."""
    return os.environ.get(CXX, "").strip() or "c++"


def stats_layers() -> str:
    """``MIKV_STATS_LAYERS``: first (default), all or off."""
    return _choice(STATS_LAYERS, STATS_LAYERS_CHOICES)


def stats_interval() -> float | None:
    """``MIKV_STATS_INTERVAL`` in seconds, or None when unset/empty; a non-number raises."""
    raw = os.environ.get(STATS_INTERVAL, "").strip()
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{STATS_INTERVAL}={raw!r}: must be a number of seconds") from None
