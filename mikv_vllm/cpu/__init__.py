"""Fused C++ MiKV ops for CPU (no vllm import): one extension module per ISA variant, built at install
time by ``mikv-vllm build-ops`` (or at engine start as a logged fallback; see :mod:`.build`).

``CpuOps`` has the reference op signatures; ``build.load()`` loads (or builds) the variant this CPU
runs and raises :class:`build.CpuOpBuildError` with the cause when it cannot.
"""

from .build import CpuOpBuildError, load
from .ops import CpuOps, decode_step, forward_chunks, forward_decode, forward_request, cpp_layout, layout_fields, prefill_step

__all__ = ["CpuOpBuildError", "CpuOps", "decode_step", "forward_chunks", "forward_decode", "forward_request", "cpp_layout", "layout_fields",
           "load", "prefill_step"]
