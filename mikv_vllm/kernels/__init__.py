"""Triton kernels for the MiKV page (no vllm import): drop-in for ``core.reference``.

``use_triton(device)`` is the one switch (CUDA + triton importable); ``get_ops(device)``
returns :class:`TritonOps`, on CPU ``mikv_vllm.cpu.CpuOps`` (fused C++ decode step), or the
reference module, all with the reference op
signatures (``write_tokens``, ``gather_context``, ``attention``, ``accumulate_scores``,
``maintain_hi``, ``forward_request``). Batched extras on TritonOps: ``store_tokens``,
``decode_attention``, ``forward_decode``. Same page layout either way.
"""

from __future__ import annotations

import os

import torch

from ._common import HAVE_TRITON, supported, use_triton

__all__ = ["HAVE_TRITON", "supported", "use_triton", "get_ops", "cpu_ops_mode"]

if HAVE_TRITON:
    from .decode import decode_attention, hi_slot_map
    from .ops import TritonOps, forward_decode, forward_request
    from .store import store_tokens, write_tokens

    __all__ += ["TritonOps", "decode_attention", "hi_slot_map", "forward_decode", "forward_request",
                "store_tokens", "write_tokens"]


CPU_OPS_ENV = "MIKV_CPU_OPS"
CPU_OPS_MODES = ("fused", "reference")


def cpu_ops_mode() -> str:
    """``$MIKV_CPU_OPS``: ``fused`` (default, the C++ op of ``mikv_vllm.cpu``) or ``reference`` (torch)."""
    mode = os.environ.get(CPU_OPS_ENV, "fused").strip().lower() or "fused"
    if mode not in CPU_OPS_MODES:
        raise ValueError(f"{CPU_OPS_ENV} must be one of {CPU_OPS_MODES}, got {mode!r}")
    return mode


def get_ops(device):
    """TritonOps when :func:`use_triton` says so; on CPU ``mikv_vllm.cpu.CpuOps`` (its C++ op is built
    here, a build failure raises) unless ``MIKV_CPU_OPS=reference``; else ``core.reference``."""
    if use_triton(device):
        return TritonOps
    if device is not None and torch.device(device).type == "cpu" and cpu_ops_mode() == "fused":
        from ..cpu import CpuOps, load

        load()
        return CpuOps
    from ..core import reference

    return reference
