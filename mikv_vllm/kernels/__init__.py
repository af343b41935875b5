"""Triton kernels for the MiKV page (no vllm import): drop-in for ``core.reference``.

``use_triton(device)`` is the one switch (CUDA + triton importable); ``get_ops(device)``
returns :class:`TritonOps` or the reference module, both with the reference op
signatures (``write_tokens``, ``gather_context``, ``attention``, ``accumulate_scores``,
``maintain_hi``, ``forward_request``). Batched extras on TritonOps: ``store_tokens``,
``decode_attention``, ``forward_decode``. Same page layout either way.
"""

from __future__ import annotations

from ._common import HAVE_TRITON, supported, use_triton

__all__ = ["HAVE_TRITON", "supported", "use_triton", "get_ops"]

if HAVE_TRITON:
    from .decode import decode_attention, hi_slot_map
    from .ops import TritonOps, forward_decode, forward_request
    from .store import store_tokens, write_tokens

    __all__ += ["TritonOps", "decode_attention", "hi_slot_map", "forward_decode", "forward_request",
                "store_tokens", "write_tokens"]


def get_ops(device):
    """TritonOps when :func:`use_triton` says so, else ``core.reference`` (same op signatures)."""
    if use_triton(device):
        return TritonOps
    from ..core import reference

    return reference
