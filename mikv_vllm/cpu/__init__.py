"""Fused C++ MiKV ops for CPU (built with torch's extension tools at first use; no vllm import).

``CpuOps`` has the reference op signatures; ``build.load()`` compiles/loads the extension and
raises :class:`build.CpuOpBuildError` with the compiler output when it cannot.
"""

from .build import CpuOpBuildError, load
from .ops import CpuOps, decode_step, forward_chunks, forward_decode, forward_request, layout_meta, prefill_step

__all__ = ["CpuOpBuildError", "CpuOps", "decode_step", "forward_chunks", "forward_decode", "forward_request", "layout_meta",
           "load", "prefill_step"]
