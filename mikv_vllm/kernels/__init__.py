"""Triton kernels for the MiKV page (no vllm import) and the Triton op set :class:`TritonOps`.

The op set implements ``ops.contract.MiKVOps``; which op set serves a device is chosen by
``mikv_vllm.ops.get_ops`` (``MIKV_VLLM_OPS``). :func:`use_triton` is the Triton switch it uses.
Batched extras: ``store_tokens``, ``decode_attention``, ``hi_slot_map``. Triton temporaries stay
within the workspace of :mod:`.workspace` (``MIKV_VLLM_WORKSPACE_MB``).
"""

from __future__ import annotations


from ._common import HAVE_TRITON, OPS_ENV, ops_choice, supported, use_triton
from .workspace import WORKSPACE_ENV, check_workspace, required_workspace, reserve_workspace, workspace_bytes

__all__ = ["HAVE_TRITON", "OPS_ENV", "WORKSPACE_ENV", "ops_choice", "supported", "use_triton",
           "check_workspace", "required_workspace", "reserve_workspace", "workspace_bytes"]

if HAVE_TRITON:
    from .decode import decode_attention, hi_slot_map
    from .ops import TritonOps, forward_decode, forward_request
    from .store import store_tokens, write_tokens

    __all__ += ["TritonOps", "decode_attention", "hi_slot_map", "forward_decode", "forward_request",
                "store_tokens", "write_tokens"]
