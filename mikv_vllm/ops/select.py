"""Which op set serves a device: ``MIKV_VLLM_OPS`` (read by ``envs.ops``)."""

from __future__ import annotations

import torch

from .. import envs
from ..core.layout import RegionLayout
from .contract import MiKVOps

OPS_ENV = envs.OPS
OPS_CHOICES = envs.OPS_CHOICES

# Op sets that do not yet store keys and values at their own widths (issue 26). Whoever adds
# k_bits != v_bits to an op set deletes its entry here (and un-skips it in the contract test).
NO_SPLIT_BITS = {"triton"}


# Op sets that store only fp16 (scale, zero) group metadata (issue 26's leaner metadata axis).
FP16_META_ONLY = {"triton"}


def check_supports(layout: RegionLayout, op_set_name: str) -> None:
    """Raise a clear error when op set ``op_set_name`` cannot serve ``layout``."""
    if layout.k_bits != layout.v_bits and op_set_name in NO_SPLIT_BITS:
        raise RuntimeError(
            f"MiKV op set {op_set_name!r} does not support keys and values at different widths yet "
            f"(k_bits {layout.k_bits}, v_bits {layout.v_bits}); set {OPS_ENV}=torch for this config")
    if layout.group_meta != "fp16" and layout.has_lo and op_set_name in FP16_META_ONLY:
        raise RuntimeError(
            f"MiKV op set {op_set_name!r} does not support group_meta {layout.group_meta!r} yet; "
            f"set {OPS_ENV}=torch for this config")


def ops_choice() -> str:
    """``MIKV_VLLM_OPS``: ``auto`` (default; Triton on CUDA, the fused C++ op on CPU), ``torch``
    (the batched torch op set everywhere), ``triton`` (the Triton ops on any device; on CPU only
    under ``TRITON_INTERPRET=1``) or ``cpu`` (the fused C++ op). Unknown values raise."""
    return envs.ops()


def get_ops(device, layout: RegionLayout | None = None) -> MiKVOps:
    """The op set for ``device`` by :func:`ops_choice`: ``TritonOps`` (``kernels``) where
    ``kernels.use_triton`` says so, ``CpuOps`` (``cpu``, built at first use; a build failure
    raises) on CPU for ``auto`` / ``cpu``, else ``TorchOps``. With ``layout``, an op set that
    cannot serve it raises (:func:`check_supports`) instead of being returned."""
    ops = _choose_ops(device)
    if layout is not None:
        check_supports(layout, ops.name)
    return ops


def _choose_ops(device) -> MiKVOps:
    from ..kernels._common import use_triton

    choice = ops_choice()
    if use_triton(device):
        from ..kernels.ops import TritonOps

        return TritonOps
    on_cpu = device is not None and torch.device(device).type == "cpu"
    if choice == "cpu" and not on_cpu:
        raise RuntimeError(f"{OPS_ENV}=cpu selects the fused C++ CPU op, but the device is {device}")
    if on_cpu and choice in ("auto", "cpu"):
        from ..cpu import CpuOps, load

        load()
        return CpuOps
    from .torch_ops import TorchOps

    return TorchOps
