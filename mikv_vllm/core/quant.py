"""Per-token asymmetric round-to-nearest quantization and bit packing.

Every token's vector ``x[..., D]`` is split into ``G = D / group`` groups; each
group gets an fp16 ``(scale, zero)`` pair (the ``k_sz``/``v_sz`` view
``[..., G, 2]``) and ``bits``-bit codes::

    zero  = fp16_round_down(min(x_g))
    scale = fp16_round_up((max(x_g) - zero) / (2^bits - 1))
    code  = clamp(floor((x - zero) / scale + 0.5), 0, 2^bits - 1)   (0 where scale == 0)
    x_hat = zero + code * scale                                      (fp32)

Codes are computed from the *stored* fp16 values, and rounding zero down and
scale up keeps the whole group inside ``[zero, zero + (2^bits-1)*scale]``, so
``|x - x_hat| <= scale/2`` (+ fp32 rounding) for every element. A constant
group is exact when its value is fp16-representable (scale 0, x_hat = zero);
otherwise zero is the fp16 value just below it and scale a tiny positive number
(< one fp16 ulp of the value / (2^bits-1)), still within the bound. Inputs
are clamped to the fp16 range ±65504 first (the bound holds for the clamped
value); nothing produces NaN/inf for finite inputs.

Non-finite inputs (docs/design.md "Non-finite K/V"): the quantizer sees ``finite_for_lo(x)``: NaN
elements as 0 and ±inf as ±65504, so every code and every (scale, zero) is defined and finite, also
for an all-NaN group (a constant-0 group: scale 0, zero 0, codes 0); a NaN never reaches the
float -> integer code conversion. Only the poisoned elements' own group sees the replacement; the
other groups and tokens quantize exactly as without it.

Packing is the little-endian bit stream of ``layout.py``: element j occupies
stream bits ``[j*bits, (j+1)*bits)``, stream bit ``8*m + k`` is bit k of byte m.
Supported bits: 2, 3, 4, 8 (``D * bits`` must be a multiple of 8).
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
FP16_MAX = 65504.0


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


# ------------------------------------------------------------------ packing
def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes ``[..., D]`` (each < 2^bits) into uint8 ``[..., D*bits/8]``."""
    _check_bits(bits)
    d = codes.shape[-1]
    if (d * bits) % 8:
        raise ValueError(f"D * bits must be a multiple of 8, got D={d}, bits={bits}")
    if bits == 8:
        return codes.to(torch.uint8).clone()
    nbytes = d * bits // 8
    pad = (-d) % 8
    c = codes.to(torch.int64)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    # 8 codes of `bits` bits make exactly `bits` bytes.
    c = c.reshape(*c.shape[:-1], c.shape[-1] // 8, 8)
    shifts = torch.arange(8, device=c.device, dtype=torch.int64) * bits
    word = (c << shifts).sum(-1, keepdim=True)                      # [..., D/8, 1]
    byte_shifts = torch.arange(bits, device=c.device, dtype=torch.int64) * 8
    out = ((word >> byte_shifts) & 0xFF).reshape(*codes.shape[:-1], c.shape[-2] * bits)
    return out[..., :nbytes].to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``[..., dim*bits/8]`` -> uint8 codes ``[..., dim]``."""
    _check_bits(bits)
    if packed.shape[-1] != dim * bits // 8 or (dim * bits) % 8:
        raise ValueError(f"packed last dim {packed.shape[-1]} does not match dim={dim}, bits={bits}")
    if bits == 8:
        return packed.to(torch.uint8).clone()
    lead = packed.shape[:-1]
    if bits in (2, 4):  # codes never straddle bytes: element j = byte j*b//8 >> (j*b % 8)
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return codes.reshape(*lead, dim)
    # 3 bits: every 3 bytes hold 8 codes (D*3 % 8 == 0 means D % 8 == 0).
    p = packed.reshape(*lead, dim // 8, 3).to(torch.int32)
    word = p[..., 0] | (p[..., 1] << 8) | (p[..., 2] << 16)                  # [..., D/8]
    shifts = torch.arange(0, 24, 3, device=packed.device, dtype=torch.int32)
    codes = (word.unsqueeze(-1) >> shifts) & 7
    return codes.reshape(*lead, dim).to(torch.uint8)


# ------------------------------------------------------------ fp16 rounding
def fp16_round_down(x: torch.Tensor) -> torch.Tensor:
    """Largest fp16 value <= ``x`` (fp32 input, clamped to ±65504)."""
    x = x.float().clamp(-FP16_MAX, FP16_MAX)
    h = x.half()
    return torch.where(h.float() > x, torch.nextafter(h, torch.full_like(h, -float("inf"))), h)


def fp16_round_up(x: torch.Tensor) -> torch.Tensor:
    """Smallest fp16 value >= ``x`` (fp32 input, clamped to ±65504)."""
    x = x.float().clamp(-FP16_MAX, FP16_MAX)
    h = x.half()
    return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, float("inf"))), h)


# ------------------------------------------------------------- quantization
def _grouped(x: torch.Tensor, group: int) -> torch.Tensor:
    d = x.shape[-1]
    if d % group:
        raise ValueError(f"group {group} does not divide D={d}")
    return x.reshape(*x.shape[:-1], d // group, group)


def finite_inputs(x: torch.Tensor) -> torch.Tensor:
    """q / k / v as the page ops see them: NaN -> 0, ±inf -> ±65504, finite values unchanged (same dtype).

    Every op set applies it at its entry, so a poisoned token computes exactly like its sanitized
    copy: its non-finite elements reach neither another row's attention (no 0 * NaN in P @ V) nor
    the score masses, and the page stays finite (docs/design.md "Non-finite q / k / v")."""
    return torch.nan_to_num(x, nan=0.0, posinf=FP16_MAX, neginf=-FP16_MAX)


def finite_for_lo(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` as the lo quantizer sees it: NaN -> 0, clamped to ±65504 (±inf -> ±65504)."""
    return torch.nan_to_num(x.float(), nan=0.0).clamp(-FP16_MAX, FP16_MAX)


def quantize_codes(x: torch.Tensor, bits: int, group: int,
                   scale_fp8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpacked variant of :func:`quantize`: (uint8 codes ``[..., D]``, fp16 sz ``[..., G, 2]``).
    ``scale_fp8``: the scale is rounded up once more, to fp8 e5m2 (:func:`e5m2_round_up`), before
    the codes are computed from it (the ``fp8-scale`` group metadata; the error bound still holds)."""
    _check_bits(bits)
    xg = _grouped(finite_for_lo(x), group)                           # [..., G, g]
    qmax = (1 << bits) - 1
    zero = fp16_round_down(xg.amin(-1))                              # [..., G] fp16
    scale = fp16_round_up((xg.amax(-1) - zero.float()) / qmax)
    if scale_fp8:
        scale = e5m2_round_up(scale)
    z, s = zero.float().unsqueeze(-1), scale.float().unsqueeze(-1)
    t = torch.where(s > 0, (xg - z) / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(xg))
    codes = torch.floor(t + 0.5).clamp_(0, qmax).to(torch.uint8)
    sz = torch.stack([scale, zero], dim=-1)                          # [..., G, 2]
    return codes.reshape(x.shape), sz


def quantize(x: torch.Tensor, bits: int, group: int, scale_fp8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x[..., D]`` -> (packed uint8 ``[..., D*bits/8]``, fp16 (scale, zero) ``[..., D/group, 2]``)."""
    codes, sz = quantize_codes(x, bits, group, scale_fp8)
    return pack_codes(codes, bits), sz


# ------------------------------------------------------- lean group metadata
def e5m2_round_up(scale: torch.Tensor) -> torch.Tensor:
    """Smallest fp8 e5m2 value >= ``scale`` (fp16, >= 0), as fp16: e5m2 is the high byte of an fp16,
    so this clears the low byte, carrying up when it was not 0. A lo scale is at most 2 * 65504 / 3
    (2 bits), below e5m2's largest finite value 57344, so nothing overflows."""
    bits = scale.to(torch.float16).view(torch.int16).to(torch.int32)
    up = ((bits + 0xFF) & 0x7F00).to(torch.int16)
    return up.view(torch.float16)


def pack_meta(sz: torch.Tensor) -> torch.Tensor:
    """fp16 (scale, zero) ``[..., G, 2]`` whose scales are e5m2 values -> uint8 ``[..., G, 3]``: the zero's
    two bytes (little-endian fp16), then the scale's high byte (its e5m2 bit pattern)."""
    if sz.numel() == 0:
        return torch.empty(*sz.shape[:-1], 3, dtype=torch.uint8, device=sz.device)
    # bit patterns as integers (a uint8 view of sz[..., i] needs a unit last stride, which a size-1
    # shape need not have even when "contiguous")
    bits = sz.to(torch.float16).contiguous().view(torch.int16).to(torch.int32) & 0xFFFF   # [..., G, 2]
    zero, scale = bits[..., 1], bits[..., 0]
    return torch.stack([zero & 0xFF, zero >> 8, scale >> 8], dim=-1).to(torch.uint8)


def unpack_meta(meta: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_meta`: uint8 ``[..., G, 3]`` -> fp16 (scale, zero) ``[..., G, 2]``."""
    if meta.numel() == 0:    # (empty views have strides a dtype view refuses)
        return torch.empty(*meta.shape[:-1], 2, dtype=torch.float16, device=meta.device)
    m = meta.to(torch.int32)
    bits = torch.stack([m[..., 2] << 8, m[..., 0] | (m[..., 1] << 8)], dim=-1)       # (scale, zero) as uint16
    return torch.where(bits >= 1 << 15, bits - (1 << 16), bits).to(torch.int16).view(torch.float16)


def dequantize_codes(codes: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    """fp32 ``zero + code * scale`` for unpacked codes ``[..., D]`` (uint8 or float)."""
    cg = _grouped(codes.float(), group)
    s = sz[..., 0].float().unsqueeze(-1)
    z = sz[..., 1].float().unsqueeze(-1)
    return torch.addcmul(z, cg, s).reshape(codes.shape)


_CODE_TABLES: dict[tuple[int, torch.device], torch.Tensor] = {}


def _code_table(bits: int, device: torch.device) -> torch.Tensor:
    """fp32 ``[bits, 256, 8]``: entry ``[m, x, j]`` is what byte m = x of a ``bits``-byte group of
    the stream adds to code j of the 8 codes it holds (codes are bit fields, so they add up)."""
    key = (bits, torch.device(device))
    if key not in _CODE_TABLES:
        x = torch.arange(256, dtype=torch.int64)
        table = torch.zeros(bits, 256, 8)
        for m in range(bits):
            for j in range(8):
                # bit k of byte m is stream bit 8m + k: bit (8m + k - j*bits) of code j when in range
                for k in range(8):
                    b = 8 * m + k - j * bits
                    if 0 <= b < bits:
                        table[m, :, j] += ((x >> k) & 1).float() * (1 << b)
        _CODE_TABLES[key] = table.to(device)
    return _CODE_TABLES[key]


def unpack_codes_float(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """:func:`unpack_codes` as fp32 (exact small integers), by table lookup: the fast path."""
    _check_bits(bits)
    if bits == 8 or packed.shape[-1] != dim * bits // 8 or dim % 8:
        return unpack_codes(packed, bits, dim).float()
    lead = packed.shape[:-1]
    table = _code_table(bits, packed.device)
    idx = packed.reshape(-1, bits).long()                                   # one row per 8 codes
    out = table[0].index_select(0, idx[:, 0])
    for m in range(1, bits):
        out += table[m].index_select(0, idx[:, m])
    return out.reshape(*lead, dim)


def dequantize(packed: torch.Tensor, sz: torch.Tensor, bits: int, group: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`quantize`: fp32 ``[..., dim]``."""
    return dequantize_codes(unpack_codes_float(packed, bits, dim), sz, group)


def fake_quantize(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """``dequantize(quantize(x))`` without packing (fp32)."""
    codes, sz = quantize_codes(x, bits, group)
    return dequantize_codes(codes, sz, group)


def to_hi(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast raw K/V to the hi-tier dtype, clamped to its finite range (like the lo path's ±65504).

    A bf16/fp32 model's values above fp16's 65504 would otherwise become inf in an fp16 hi tier
    (then NaN in attention); they are stored as ±finfo(dtype).max instead. NaN is stored as 0 (as in
    the lo copy), so a poisoned token's hi copy cannot turn later steps' attention into NaN.
    """
    top = torch.finfo(dtype).max
    return torch.nan_to_num(x.float(), nan=0.0).clamp(-top, top).to(dtype)
