"""Triton kernels for the MiKV page (no vllm import): drop-in for ``core.reference``.

``use_triton(device)`` is the one switch, set by ``MIKV_VLLM_OPS`` (``auto``: Triton on CUDA
when triton imports; ``torch``: core.reference; ``triton``: the kernels on any device, on CPU
under ``TRITON_INTERPRET=1``). ``get_ops(device)`` returns :class:`TritonOps` or the reference
module, both with the reference op signatures (``write_tokens``, ``gather_context``,
``attention``, ``accumulate_scores``, ``maintain_hi``, ``forward_request``,
``forward_decode``). Batched extras on TritonOps: ``store_tokens``, ``decode_attention``,
``chunked_attention``. Same page layout either way; temporaries within the workspace of
:mod:`.workspace` (``MIKV_VLLM_WORKSPACE_MB``).
"""

from __future__ import annotations

from ._common import HAVE_TRITON, OPS_ENV, ops_choice, supported, use_triton
from .workspace import WORKSPACE_ENV, check_workspace, required_workspace, reserve_workspace, workspace_bytes

__all__ = ["HAVE_TRITON", "OPS_ENV", "WORKSPACE_ENV", "ops_choice", "supported", "use_triton", "get_ops",
           "check_workspace", "required_workspace", "reserve_workspace", "workspace_bytes"]

if HAVE_TRITON:
    from .decode import decode_attention, hi_slot_map
    from .ops import TritonOps, chunked_attention, forward_decode, forward_request
    from .store import store_tokens, write_tokens

    __all__ += ["TritonOps", "chunked_attention", "decode_attention", "hi_slot_map", "forward_decode",
                "forward_request",
                "store_tokens", "write_tokens"]


def get_ops(device):
    """TritonOps when :func:`use_triton` says so (``MIKV_VLLM_OPS``), else ``core.reference``."""
    if use_triton(device):
        return TritonOps
    from ..core import reference

    return reference
