"""Store kernel: lo copies of new K (times balancer) / V, R-tag reset.

Keys at ``k_bits``, values at ``v_bits`` (constexprs ``KB`` / ``VB``), group metadata as fp16
(scale, zero) or fp8-scale (``FP8S``: ``quant.pack_meta``'s three bytes).

One program per (token, KV head). Quantization follows core/quant.py step by
step in fp32 with correctly rounded division (``div_rn``) and fp16 directed
rounding; FP contraction is disabled at launch (``enable_fp_fusion=False``),
so codes and (scale, zero) equal the reference bit for bit (tested under the
interpreter; the GPU benchmark re-checks on the device). Scores belong to hi slots and are set
when a slot is filled (``upkeep`` / ``core.reference.maintain_hi``), so the store touches none.
"""

from __future__ import annotations

import torch

from ..core.layout import RegionLayout
from ..core.page import token_slots
from ._common import e5m2_round_up, f16_round_down, f16_round_up, lo_args, lo_constexprs, next_pow2, tl, triton


@triton.jit
def _quant_pack_store(x, lo_ptr, sz_ptr, D: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr,
                      FP8S: tl.constexpr):
    """Quantize fp32 ``x [D]`` per group of GS and store packed codes + (scale, zero): two fp16, or
    with FP8S the scale rounded up to e5m2 and the three bytes of ``quant.pack_meta``."""
    NG: tl.constexpr = D // GS
    QMAX: tl.constexpr = (1 << BITS) - 1
    x = tl.minimum(tl.maximum(tl.where(x != x, 0.0, x), -65504.0), 65504.0)   # quant.finite_for_lo
    xg = tl.reshape(x, (NG, GS))
    zero = f16_round_down(tl.min(xg, axis=1))                                    # [NG] fp16
    scale = f16_round_up(tl.math.div_rn(tl.max(xg, axis=1) - zero.to(tl.float32), QMAX * 1.0))
    gi = tl.arange(0, NG)
    if FP8S:   # zero's two bytes (little-endian), then the scale's high byte (its e5m2 pattern)
        scale = e5m2_round_up(scale)
        zb = zero.to(tl.int16, bitcast=True).to(tl.int32)
        tl.store(sz_ptr + gi * 3, (zb & 255).to(tl.uint8))
        tl.store(sz_ptr + gi * 3 + 1, ((zb >> 8) & 255).to(tl.uint8))
        tl.store(sz_ptr + gi * 3 + 2, ((scale.to(tl.int16, bitcast=True).to(tl.int32) >> 8) & 255).to(tl.uint8))
    else:
        tl.store(sz_ptr + gi * 2, scale)
        tl.store(sz_ptr + gi * 2 + 1, zero)
    z = zero.to(tl.float32)[:, None]
    s = scale.to(tl.float32)[:, None]
    pos = s > 0
    t = tl.where(pos, tl.math.div_rn(xg - z, tl.where(pos, s, 1.0)), 0.0)
    codes = tl.minimum(tl.maximum(tl.floor(t + 0.5), 0.0), QMAX * 1.0).to(tl.int32)
    if BITS == 8:
        tl.store(lo_ptr + tl.arange(0, D), tl.reshape(codes, (D,)).to(tl.uint8))
    else:
        c8 = tl.reshape(codes, (D // 8, 8))                                     # 8 codes = BITS bytes
        word = tl.sum(c8 << (tl.arange(0, 8) * BITS)[None, :], axis=1)
        ci = tl.arange(0, D // 8)
        for i in tl.static_range(BITS):
            tl.store(lo_ptr + ci * BITS + i, ((word >> (8 * i)) & 255).to(tl.uint8))


@triton.jit
def _store_kernel(k_ptr, v_ptr, skt, skh, svt, svh, bal_ptr, sbt, sbh, blk_ptr, off_ptr,
                  klo, vlo, lo_sb, lo_sh, klo_sn, vlo_sn, ksz, vsz, sz_sb, sz_sh, sz_sn,
                  tag_ptr, tg_sb, tg_sh,
                  D: tl.constexpr, KB: tl.constexpr, VB: tl.constexpr, GS: tl.constexpr, FP8S: tl.constexpr,
                  R: tl.constexpr, RP: tl.constexpr, HAS_BAL: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    blk = tl.load(blk_ptr + t).to(tl.int64)
    off = tl.load(off_ptr + t).to(tl.int64)
    if R > 0:
        ri = tl.arange(0, RP)
        tl.store(tag_ptr + blk * tg_sb + h * tg_sh + ri, tl.zeros((RP,), tl.int32), mask=(ri < R) & (ri + off == ri))
    if KB > 0:
        d = tl.arange(0, D)
        k = tl.load(k_ptr + t * skt + h * skh + d).to(tl.float32)
        if HAS_BAL:
            k = k * tl.load(bal_ptr + t * sbt + h * sbh + d)
        v = tl.load(v_ptr + t * svt + h * svh + d).to(tl.float32)
        lo = blk * lo_sb + h * lo_sh
        sz = blk * sz_sb + h * sz_sh + off * sz_sn
        _quant_pack_store(k, klo + lo + off * klo_sn, ksz + sz, D, KB, GS, FP8S)
        _quant_pack_store(v, vlo + lo + off * vlo_sn, vsz + sz, D, VB, GS, FP8S)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def store_tokens(regions: torch.Tensor, layout: RegionLayout, blk: torch.Tensor, off: torch.Tensor,
                 k: torch.Tensor, v: torch.Tensor, balancer: torch.Tensor | None = None) -> None:
    """Batched store: token i of ``k, v [T, H, D]`` goes to (block ``blk[i]``, offset ``off[i]``).

    ``balancer`` is ``[H, D]`` (shared) or ``[T, H, D]`` (per token), fp32 stored values.
    """
    t, h, d = k.shape
    if t == 0:
        return
    views = layout.views(regions)
    k, v = _rows(k), _rows(v)
    if balancer is not None:
        bal = balancer.to(regions.device, torch.float32).contiguous()
        sbt, sbh = (0, bal.stride(0)) if bal.dim() == 2 else (bal.stride(0), bal.stride(1))
    else:
        bal, sbt, sbh = k, 0, 0
    r = layout.hi_slots
    _store_kernel[(t, h)](
        k, v, k.stride(0), k.stride(1), v.stride(0), v.stride(1), bal, sbt, sbh,
        blk.to(regions.device, torch.int64).contiguous(), off.to(regions.device, torch.int64).contiguous(),
        *lo_args(layout, views, regions), views.tag if r else regions, views.tag.stride(0), views.tag.stride(1),
        D=d, **lo_constexprs(layout), R=r, RP=max(1, next_pow2(r)),
        HAS_BAL=balancer is not None, num_warps=1, enable_fp_fusion=False)


def write_tokens(regions: torch.Tensor, layout: RegionLayout, block_row: torch.Tensor, start: int,
                 k: torch.Tensor, v: torch.Tensor, balancer: torch.Tensor | None = None) -> None:
    """Drop-in for ``core.reference.write_tokens`` (same arguments and page effects)."""
    if k.shape[0] == 0:
        return
    blk, off = token_slots(block_row.to(regions.device), start, start + k.shape[0], layout.block_size)
    store_tokens(regions, layout, blk, off, k, v, balancer)
