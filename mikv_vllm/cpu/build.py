"""Build (once per machine) and load the C++ CPU ops (``mikv_cpu.cpp`` bindings, ``mikv_decode.cpp``,
``mikv_prefill.cpp``, shared ``mikv_common.h``) with torch's extension tools.

The extension is compiled at first use with the host compiler (``-O3 -march=native -fopenmp``,
512-bit vectors preferred) into ``$MIKV_CPU_BUILD_DIR`` (default
``~/.cache/mikv-vllm/torch_extensions``: the user's cache, writable also where the model cache
``$MIKV_VLLM_CACHE`` is read-only, as in the container image); the build name
carries a hash of the source, the flags, torch's version and the CPU's feature flags, so an
edited source or another CPU gets its own build. A failed build raises :class:`CpuOpBuildError`
with the compiler output: there is no silent fallback.
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
from pathlib import Path

import torch

_HERE = Path(__file__).parent
SOURCES = [_HERE / "mikv_cpu.cpp", _HERE / "mikv_decode.cpp", _HERE / "mikv_prefill.cpp"]   # compiled and linked
HEADERS = [_HERE / "mikv_common.h"]                              # hashed into the build name
CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-DNDEBUG"]
LDFLAGS = ["-fopenmp"]

_LOCK = threading.Lock()
_MODULE = None


class CpuOpBuildError(RuntimeError):
    """The C++ CPU op could not be compiled or loaded (message holds the compiler error)."""


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


BUILD_DIR_ENV = "MIKV_CPU_BUILD_DIR"


def build_dir() -> Path:
    """``$MIKV_CPU_BUILD_DIR`` or ``~/.cache/mikv-vllm/torch_extensions``."""
    env = os.environ.get(BUILD_DIR_ENV)
    return Path(env) if env else Path.home() / ".cache" / "mikv-vllm" / "torch_extensions"


def build_name() -> str:
    h = hashlib.sha256()
    for part in (*(p.read_bytes() for p in SOURCES + HEADERS), " ".join(CFLAGS + LDFLAGS).encode(), torch.__version__.encode(),
                 _cpu_flags().encode(), platform.machine().encode()):
        h.update(part)
    return f"mikv_cpu_{h.hexdigest()[:12]}"


def load():
    """The compiled extension module (built on first call; thread-safe)."""
    global _MODULE
    if _MODULE is not None:
        return _MODULE
    with _LOCK:
        if _MODULE is None:
            from torch.utils.cpp_extension import load as _load

            name = build_name()
            directory = build_dir() / name
            directory.mkdir(parents=True, exist_ok=True)
            try:
                _MODULE = _load(name=name, sources=[str(p) for p in SOURCES], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
                                build_directory=str(directory), verbose=os.environ.get("MIKV_CPU_BUILD_VERBOSE") == "1")
            except Exception as exc:
                raise CpuOpBuildError(
                    f"building the MiKV C++ CPU op from {', '.join(p.name for p in SOURCES)} in {directory} failed (needs a C++17 compiler "
                    f"and ninja; set MIKV_VLLM_OPS=torch to run the torch reference instead): {exc}") from exc
    return _MODULE
