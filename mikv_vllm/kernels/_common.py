"""Shared kernel helpers: optional triton import, the CUDA switch, fp16 directed rounding."""

from __future__ import annotations

import os

import torch

try:  # triton is optional (CPU-only installs); the kernels are only defined when it imports
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - exercised on installs without triton
    triton = tl = None
    HAVE_TRITON = False


def use_triton(device: torch.device | str | None) -> bool:
    """The one switch: True on CUDA devices when triton imports (``MIKV_TRITON=0`` forces False)."""
    if not HAVE_TRITON or device is None or os.environ.get("MIKV_TRITON", "1") == "0":
        return False
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def supported(layout) -> bool:
    """Layouts the Triton path handles: power-of-two head_dim in [16, 256] and quant group."""
    d, g = layout.head_dim, layout.group
    return 16 <= d <= 256 and d & (d - 1) == 0 and g & (g - 1) == 0


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


_SM_COUNT: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (8 elsewhere: the interpreter)."""
    if device.type != "cuda":
        return 8
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


if HAVE_TRITON:

    @triton.jit
    def f16_round_down(x):
        """Largest fp16 value <= fp32 ``x`` (``x`` within ±65504), as core.quant.fp16_round_down."""
        h = x.to(tl.float16)
        hf = h.to(tl.float32)
        bits = h.to(tl.int16, bitcast=True).to(tl.int32)
        nxt = tl.where(hf > 0, bits - 1, tl.where(hf < 0, bits + 1, -32767))   # -32767 = 0x8001
        return tl.where(hf > x, nxt, bits).to(tl.int16).to(tl.float16, bitcast=True)

    @triton.jit
    def f16_round_up(x):
        """Smallest fp16 value >= fp32 ``x`` (``x`` within ±65504), as core.quant.fp16_round_up."""
        h = x.to(tl.float16)
        hf = h.to(tl.float32)
        bits = h.to(tl.int16, bitcast=True).to(tl.int32)
        nxt = tl.where(hf > 0, bits + 1, tl.where(hf < 0, bits - 1, 1))
        return tl.where(hf < x, nxt, bits).to(tl.int16).to(tl.float16, bitcast=True)
