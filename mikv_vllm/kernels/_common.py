"""Shared kernel helpers: optional triton import, the CUDA switch, fp16 directed rounding, the lo
tier's kernel arguments."""

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


def lo_args(layout, views, regions: torch.Tensor) -> tuple:
    """The lo tier's pointer / stride arguments of the store and attention kernels, in their order
    ``klo, vlo, lo_sb, lo_sh, klo_sn, vlo_sn, ksz, vsz, sz_sb, sz_sh, sz_sn`` (K and V codes have
    their own per-token strides: ``k_packed_bytes`` / ``v_packed_bytes``); ``regions`` stands in
    for every pointer of a layout without a lo tier."""
    if not layout.has_lo:
        sb, sh, _ = regions.stride()
        return regions, regions, sb, sh, 1, 1, regions, regions, sb, sh, 1
    klo, vlo, ksz = views.k_lo, views.v_lo, views.k_sz
    return (klo, vlo, *klo.stride()[:2], klo.stride(2), vlo.stride(2), ksz, views.v_sz, *ksz.stride()[:3])


def lo_constexprs(layout) -> dict:
    """The lo tier's constexprs: key and value widths (0: no lo tier), group size, fp8-scale metadata."""
    return dict(KB=layout.k_bits, VB=layout.v_bits, GS=layout.group, FP8S=layout.scale_fp8)


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

    @triton.jit
    def e5m2_round_up(scale):
        """Smallest fp8 e5m2 value >= fp16 ``scale`` (>= 0), as fp16 (core.quant.e5m2_round_up):
        the low byte cleared, carrying up when it was not 0."""
        bits = scale.to(tl.int16, bitcast=True).to(tl.int32)
        return ((bits + 0xFF) & 0x7F00).to(tl.int16).to(tl.float16, bitcast=True)
