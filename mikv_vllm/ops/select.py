"""Which op set serves a device: ``MIKV_VLLM_OPS`` (read by ``envs.ops``)."""

from __future__ import annotations

import torch

from .. import envs
from .contract import MiKVOps

OPS_ENV = envs.OPS
OPS_CHOICES = envs.OPS_CHOICES

def ops_choice() -> str:
    """``MIKV_VLLM_OPS``: ``auto`` (default; Triton on CUDA, the fused C++ op on CPU), ``torch``
    (the batched torch op set everywhere), ``triton`` (the Triton ops on any device; on CPU only
    under ``TRITON_INTERPRET=1``) or ``cpu`` (the fused C++ op). Unknown values raise."""
    return envs.ops()


def get_ops(device) -> MiKVOps:
    """The op set for ``device`` by :func:`ops_choice`: ``TritonOps`` (``kernels``) where
    ``kernels.use_triton`` says so, ``CpuOps`` (``cpu``, built at first use; a build failure
    raises) on CPU for ``auto`` / ``cpu``, else ``TorchOps``."""
    return _choose_ops(device)


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
