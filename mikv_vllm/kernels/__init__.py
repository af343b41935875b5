"""Triton kernels for the MiKV page (no vllm import): drop-in for ``core.reference``.

``get_ops(device)`` picks the op set by ``MIKV_VLLM_OPS`` (:func:`._common.ops_choice`):

* ``auto`` (default): :class:`TritonOps` on CUDA when triton imports; on CPU
  ``mikv_vllm.cpu.CpuOps`` (the fused C++ op, prebuilt at install time or built at engine start;
  a build failure raises);
* ``torch``: ``core.reference`` everywhere;
* ``triton``: the Triton kernels on any device (on CPU under ``TRITON_INTERPRET=1``);
* ``cpu``: ``CpuOps`` (CPU devices only).

All op sets have the reference op signatures (``write_tokens``, ``gather_context``,
``attention``, ``accumulate_scores``, ``maintain_hi``, ``forward_request``,
``forward_decode``). Batched extras on TritonOps: ``store_tokens``, ``decode_attention``,
``chunked_attention``. Same page layout either way; Triton temporaries stay within the
workspace of :mod:`.workspace` (``MIKV_VLLM_WORKSPACE_MB``).
"""

from __future__ import annotations

import torch

from ._common import HAVE_TRITON, OPS_ENV, ops_choice, supported, use_triton
from .workspace import WORKSPACE_ENV, check_workspace, required_workspace, reserve_workspace, workspace_bytes

__all__ = ["HAVE_TRITON", "OPS_ENV", "WORKSPACE_ENV", "ops_choice", "supported", "use_triton", "get_ops",
           "check_workspace", "required_workspace", "reserve_workspace", "workspace_bytes"]

if HAVE_TRITON:
    from .decode import decode_attention, hi_slot_map
    from .ops import TritonOps, forward_decode, forward_request
    from .store import store_tokens, write_tokens

    __all__ += ["TritonOps", "decode_attention", "hi_slot_map", "forward_decode", "forward_request",
                "store_tokens", "write_tokens"]


def get_ops(device):
    """The op set for ``device`` chosen by ``MIKV_VLLM_OPS`` (see the module docstring)."""
    if use_triton(device):
        return TritonOps
    choice = ops_choice()
    on_cpu = device is not None and torch.device(device).type == "cpu"
    if choice == "cpu" and not on_cpu:
        raise RuntimeError(f"{OPS_ENV}=cpu selects the fused C++ CPU op, but the device is {device}")
    if on_cpu and choice in ("auto", "cpu"):
        from ..cpu import CpuOps, load

        load()
        return CpuOps
    from ..core import reference

    return reference
