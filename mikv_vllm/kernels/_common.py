"""Shared kernel helpers: optional triton import, the CUDA switch, fp16 directed rounding."""

from __future__ import annotations

import torch

try:  # triton is optional (CPU-only installs); the kernels are only defined when it imports
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - exercised on installs without triton
    triton = tl = None
    HAVE_TRITON = False


from ..ops.select import OPS_CHOICES, OPS_ENV, ops_choice  # noqa: E402,F401  (the switch lives in ops/)


def interpreting() -> bool:
    """True when the kernels were decorated under ``TRITON_INTERPRET=1`` (they run on CPU tensors)."""
    if not HAVE_TRITON:
        return False
    return type(f16_round_down).__name__ == "InterpretedFunction"   # a jit function of this module


def use_triton(device: torch.device | str | None) -> bool:
    """The one switch, by :func:`ops_choice`: ``auto`` = CUDA device and triton importable;
    ``torch`` = never; ``triton`` = always, else a clear error (no triton, or a CPU device
    without the interpreter)."""
    choice = ops_choice()
    if choice in ("torch", "cpu") or device is None:
        return False
    dev = torch.device(device)
    if choice == "auto":
        return HAVE_TRITON and dev.type == "cuda" and torch.cuda.is_available()
    if not HAVE_TRITON:
        raise RuntimeError(f"{OPS_ENV}=triton but triton does not import in this environment")
    if dev.type != "cuda" and not interpreting():
        raise RuntimeError(f"{OPS_ENV}=triton on a {dev.type} device needs TRITON_INTERPRET=1 set before "
                           "triton is imported (the interpreter runs the kernels on CPU tensors)")
    return True


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
