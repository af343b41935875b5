"""Hi-set upkeep kernel of the decode step: ``reference.maintain_hi_decode`` in Triton.

One program per (request, KV head), after the step's store and score accumulation. Candidates
are the request's tagged tokens (tag in ``(0, pos]`` in its own blocks; score: their slot's, as
accumulated by ``decode._score_kernel``) plus the new token (score: its mass of this step,
``decode_attention``'s ``new_mass``, saturated at the score dtype's max); the
``max(0, C - budget)`` lowest-priority candidates lose. In a normal run ``C <= budget + 1`` (the
budget never shrinks as the context grows), so this is one reduction pass; stale tags of reused
blocks only add passes. Each pass removes the lowest-priority live candidate of the
order of ``core.importance.select_hi`` (tier SINK > RECENT > HEAVY; sinks lower position
first, recent higher position first, heavy higher score first (NaN as -inf), then higher
position; full ties: lower candidate index first, as the reference's stable sorts). Losers and
stale tags are cleared (their scores left as they are); a kept new token takes the lowest free
slot with its raw K/V in the hi dtype, clamped as ``quant.to_hi``, and its mass as the slot's
score. Budget and recent-window start come from ``core.importance`` on the host side (device
tensors, no sync). Tags, scores and hi copies equal the reference byte for byte
(tests/kernels/test_upkeep.py).
"""

from __future__ import annotations

import torch

from ..config import MiKVConfig
from ..core.importance import hi_budget, recent_window
from ..core.layout import RegionLayout
from ._common import next_pow2, tl, triton


@triton.jit
def _lowest(alive, tier, sc_key, p_key, s):
    """The lowest-priority candidate among ``alive``: its (tier, score key, priority key, slot); lowest
    tier first, then score, then priority key; a full tie goes to the higher slot (the one that loses)."""
    t_min = tl.min(tl.where(alive, tier, 3))
    m = alive & (tier == t_min)
    s_min = tl.min(tl.where(m, sc_key, float("inf")))
    m = m & (sc_key == s_min)
    k_min = tl.min(tl.where(m, p_key, 1 << 62))
    m = m & (p_key == k_min)
    return t_min, s_min, k_min, tl.max(tl.where(m, s, -1))


_SINK, _RECENT, _HEAVY = 2, 1, 0


@triton.jit
def _bf16_rtne(x):
    """fp32 -> bf16 rounded to nearest even, NaN -> 0x7FC0 (as torch's cast; the interpreter's own
    cast truncates)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    out = tl.where(x != x, 0x7FC0, rounded)
    return out.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _fp8e4m3_rtne(x):
    """fp32 (|x| <= 448, or NaN) -> float8_e4m3fn rounded to nearest, ties to even, NaN -> 0x7F (with
    its sign), as torch's cast. Built from the bits: the interpreter's own fp32 -> fp8 cast drops
    mantissa carries (1.97 -> 1.0) and mangles NaN."""
    bits = x.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    qe = tl.maximum(e, -6) - 3                          # 3 mantissa bits; subnormals below 2^-6
    quantum = ((qe + 127) << 23).to(tl.float32, bitcast=True)
    m = tl.abs(x) / quantum                              # exact: a power-of-two division
    r = tl.floor(m + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    r = tl.where(((r - m) == 0.5) & odd, r - 1.0, r)    # ties to even
    r = tl.where(x != x, 0.0, r)
    code = (qe + 10) * 8 + r.to(tl.int32) - 8            # exponent field and mantissa; a carry (r = 16) lands right
    code = tl.where(x != x, 0x7F, code) + tl.where(bits < 0, 0x80, 0)
    return code.to(tl.uint8).to(tl.float8e4nv, bitcast=True)


@triton.jit
def _upkeep_kernel(bt_ptr, bt_sb, pos_ptr, budget_ptr, rstart_ptr, tag_ptr, tg_sb, tg_sh,
                   score_ptr, sc_sb, sc_sh, nm_ptr, snmb, snmh, khi_ptr, vhi_ptr, hi_sb, hi_sh, hi_sr,
                   k_ptr, v_ptr, skb, skh, svb, svh, top, sc_top, sinks,
                   N: tl.constexpr, R: tl.constexpr, D: tl.constexpr, SLOTS: tl.constexpr, HI_BF16: tl.constexpr,
                   HI_FP8: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    pos = tl.load(pos_ptr + b).to(tl.int64)
    budget = tl.load(budget_ptr + b).to(tl.int64)
    rstart = tl.load(rstart_ptr + b).to(tl.int64)
    num_slots = (pos // N + 1) * R
    s = tl.arange(0, SLOTS).to(tl.int64)                     # slot index; num_slots = the new token
    own = s < num_slots
    blk = tl.load(bt_ptr + b * bt_sb + s // R, mask=own, other=0).to(tl.int64)
    tag_addr = tag_ptr + blk * tg_sb + h * tg_sh + s % R
    tags = tl.load(tag_addr, mask=own, other=0)
    tagged = own & (tags > 0) & (tags <= pos)
    is_new = s == num_slots
    valid = tagged | is_new
    p = tl.where(tagged, tags.to(tl.int64) - 1, tl.where(is_new, pos, -1))
    tier = tl.where(p < sinks, 2, tl.where(p >= rstart, 1, 0))
    heavy = valid & (tier == 0)
    sc_addr = score_ptr + blk * sc_sb + h * sc_sh + s % R
    sc = tl.load(sc_addr, mask=heavy & tagged, other=0.0).to(tl.float32)      # a hi token: its slot's score
    new_sc = tl.load(nm_ptr + b * snmb + h * snmh).to(tl.float32)
    new_sc = tl.where(new_sc > sc_top, sc_top, new_sc)       # the new token: its mass (clamp keeps NaN)
    sc = tl.where(is_new, new_sc, sc)
    sc = tl.where(sc != sc, -float("inf"), sc)               # NaN ranks as -inf
    sc_key = tl.where(heavy, sc, 0.0)                        # within-tier key of heavy hitters only
    p_key = tl.where(tier == 2, -p, p)                       # lowest priority = smallest key
    big = 1 << 62
    alive = valid
    n_lose = tl.maximum(tl.sum(valid.to(tl.int64)) - budget, 0)
    for _ in range(0, n_lose):                               # one pass per loser (one in a normal step)
        worst = _lowest(alive, tier, sc_key, p_key, s)[3]
        alive = alive & (s != worst)
    new_tags = tl.where(alive & tagged, tags, 0)
    new_kept = tl.sum((alive & is_new).to(tl.int32)) > 0
    free = tl.min(tl.where(own & (new_tags == 0), s, big))   # lowest free slot
    new_tags = tl.where(new_kept & (s == free), (pos + 1).to(tl.int32), new_tags)
    tl.store(tag_addr, new_tags, mask=own)
    fslot = tl.minimum(free, num_slots - 1)
    fblk = tl.load(bt_ptr + b * bt_sb + fslot // R).to(tl.int64)
    tl.store(score_ptr + fblk * sc_sb + h * sc_sh + fslot % R, new_sc.to(score_ptr.dtype.element_ty), mask=new_kept)
    d = tl.arange(0, D)
    hi = fblk * hi_sb + h * hi_sh + (fslot % R) * hi_sr + d
    wmask = (tl.zeros((D,), tl.int32) + new_kept.to(tl.int32)) > 0
    k = tl.load(k_ptr + b * skb + h * skh + d).to(tl.float32)
    v = tl.load(v_ptr + b * svb + h * svh + d).to(tl.float32)
    k = tl.where(k != k, 0.0, tl.minimum(tl.maximum(k, -top), top))    # quant.to_hi: NaN -> 0, clamped
    v = tl.where(v != v, 0.0, tl.minimum(tl.maximum(v, -top), top))
    if HI_BF16:
        tl.store(khi_ptr + hi, _bf16_rtne(k), mask=wmask)
        tl.store(vhi_ptr + hi, _bf16_rtne(v), mask=wmask)
    elif HI_FP8:
        tl.store(khi_ptr + hi, _fp8e4m3_rtne(k), mask=wmask)
        tl.store(vhi_ptr + hi, _fp8e4m3_rtne(v), mask=wmask)
    else:
        tl.store(khi_ptr + hi, k.to(khi_ptr.dtype.element_ty), mask=wmask)
        tl.store(vhi_ptr + hi, v.to(vhi_ptr.dtype.element_ty), mask=wmask)


def maintain_hi_decode(regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig,
                       block_tables: torch.Tensor, pos: torch.Tensor, k_new: torch.Tensor,
                       v_new: torch.Tensor, mass: torch.Tensor, *, budget: torch.Tensor | None = None,
                       rstart: torch.Tensor | None = None) -> None:
    """Drop-in for ``ops.torch_decode.maintain_hi_decode`` (same arguments and page effects).
    ``budget`` / ``rstart`` (int64 ``[B]``): each row's hi budget and first recent position, when
    the step plan has them (else computed here).

    ``block_tables [B, M]`` must cover each request's blocks of positions ``[0, pos]``. ``mass``:
    the new token's attention mass, ``[B, H]`` (``decode_attention``'s ``new_mass``), or the
    reference's position-indexed ``[B, H, S]`` (read at ``pos``; a gather, no host sync).
    """
    r = layout.hi_slots
    if not r or pos.numel() == 0:
        return
    views, n, dev = layout.views(regions), layout.block_size, regions.device
    pos = pos.to(dev, torch.int64).contiguous()
    bt = block_tables.to(dev).contiguous()
    if budget is None or rstart is None:
        length = pos + 1
        budget = hi_budget(config, length, (pos // n + 1) * r).contiguous()
        rstart = (length - recent_window(config, budget)).contiguous()
    k, v = k_new.to(dev), v_new.to(dev)
    bsz, h = pos.shape[0], regions.shape[1]
    mass = mass.to(dev, torch.float32)
    if mass.dim() == 3:
        mass = mass.gather(2, pos[:, None, None].expand(bsz, h, 1))[..., 0]
    k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
    top = float(torch.finfo(layout.hi_dtype).max)
    _upkeep_kernel[(bsz, h)](
        bt, bt.stride(0), pos, budget, rstart, views.tag, views.tag.stride(0), views.tag.stride(1),
        views.score, views.score.stride(0), views.score.stride(1), mass, mass.stride(0), mass.stride(1),
        views.k_hi, views.v_hi, *views.k_hi.stride()[:3], k, v, k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), top, float(torch.finfo(layout.score_dtype).max), int(config.sink_tokens), N=n, R=r,
        D=layout.head_dim, SLOTS=next_pow2(bt.shape[1] * r + 1),
        HI_BF16=layout.hi_dtype == torch.bfloat16,
        HI_FP8=layout.hi_dtype == torch.float8_e4m3fn, num_warps=4)
