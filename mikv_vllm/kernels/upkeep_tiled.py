"""The decode step's hi-set upkeep, tiled over slots (``upkeep._upkeep_kernel``'s semantics).

One program per (row, KV head) walks the slots of the row's owned blocks (block column >=
``own``; a shared prefix block is read-only, docs/design.md "Shared blocks") in tiles of ``TILE``
lanes (a constant, not a function of the context): pass 1 counts the candidates (tags in
``(0, pos]``) and clears stale tags; then one pass per loser (``max(0, candidates + 1 - budget)``, one in a normal step) finds
the lowest-priority candidate - the new token included, as the highest index - with the order of
``core.importance.select_hi`` (tier SINK > RECENT > HEAVY; sinks lower position first, recent
higher position first, heavy higher score first with NaN as -inf, then higher position; full
ties: the higher index loses) and clears its tag; a kept new token takes the lowest free slot with
its hi copy and its mass as the slot's score. ``seq`` = pos + 1, 0 = a padded row (a no-op).
"""

from __future__ import annotations

from ._common import tl, triton
from .upkeep import _bf16_rtne, _fp8e4m3_rtne, _lowest


@triton.jit
def _tier(p, sinks, rstart):
    return tl.where(p < sinks, 2, tl.where(p >= rstart, 1, 0))


@triton.jit
def _tiled_upkeep_kernel(bt_ptr, bt_sb, seq_ptr, own_ptr, budget_ptr, rstart_ptr, tag_ptr, tg_sb, tg_sh,
                         score_ptr, sc_sb, sc_sh, nm_ptr, snmb, khi_ptr, vhi_ptr, hi_sb, hi_sh, hi_sr,
                         k_ptr, v_ptr, skb, skh, svb, svh, top, sc_top, sinks,
                         N: tl.constexpr, R: tl.constexpr, D: tl.constexpr, TILE: tl.constexpr,
                         HI_BF16: tl.constexpr, HI_FP8: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    pos = tl.load(seq_ptr + b).to(tl.int64) - 1
    if pos >= 0:
        budget = tl.load(budget_ptr + b).to(tl.int64)
        rstart = tl.load(rstart_ptr + b).to(tl.int64)
        num_slots = (pos // N + 1) * R
        first = tl.load(own_ptr + b) * R                 # the owned blocks' first slot: shared ones are read-only
        big = 1 << 62
        lanes = tl.arange(0, TILE).to(tl.int64)
        # the new token's keys: tier, score (its mass, saturated; NaN ranks as -inf), position key
        new_sc = tl.load(nm_ptr + b * snmb + h).to(tl.float32)
        new_sc = tl.where(new_sc > sc_top, sc_top, new_sc)
        n_tier = _tier(pos, sinks, rstart)
        n_key = tl.where(n_tier == 0, tl.where(new_sc != new_sc, -float("inf"), new_sc), 0.0)
        n_pk = tl.where(n_tier == 2, -pos, pos)
        # pass 1: count the candidates, clear stale tags
        count = tl.zeros((), tl.int64)
        for s0 in range(first, num_slots, TILE):
            s = s0 + lanes
            own = s < num_slots
            blk = tl.load(bt_ptr + b * bt_sb + s // R, mask=own, other=0).to(tl.int64)
            addr = tag_ptr + blk * tg_sb + h * tg_sh + s % R
            tags = tl.load(addr, mask=own, other=0)
            tagged = own & (tags > 0) & (tags <= pos)
            count += tl.sum(tagged.to(tl.int64))
            tl.store(addr, tl.zeros((TILE,), tl.int32), mask=own & (tags != 0) & ~tagged)
        tl.debug_barrier()
        new_alive = tl.zeros((), tl.int32) + 1
        n_lose = tl.maximum(count + 1 - budget, 0)
        for _ in range(0, n_lose):
            bt_ = tl.zeros((), tl.int32) + 3
            bs_ = tl.zeros((), tl.float32) + float("inf")
            bk_ = tl.zeros((), tl.int64) + big
            bw_ = tl.zeros((), tl.int64) - 1
            for s0 in range(first, num_slots, TILE):
                s = s0 + lanes
                own = s < num_slots
                blk = tl.load(bt_ptr + b * bt_sb + s // R, mask=own, other=0).to(tl.int64)
                tags = tl.load(tag_ptr + blk * tg_sb + h * tg_sh + s % R, mask=own, other=0)
                tagged = own & (tags > 0) & (tags <= pos)
                p = tl.where(tagged, tags.to(tl.int64) - 1, -1)
                tier = _tier(p, sinks, rstart)
                heavy = tagged & (tier == 0)
                sc = tl.load(score_ptr + blk * sc_sb + h * sc_sh + s % R, mask=heavy, other=0.0).to(tl.float32)
                sc_key = tl.where(heavy, tl.where(sc != sc, -float("inf"), sc), 0.0)
                p_key = tl.where(tier == 2, -p, p)
                t_min, s_min, k_min, w = _lowest(tagged, tier, sc_key, p_key, s)
                better = (t_min < bt_) | ((t_min == bt_) & ((s_min < bs_) | ((s_min == bs_) & (
                    (k_min < bk_) | ((k_min == bk_) & (w > bw_))))))
                bt_ = tl.where(better, t_min, bt_)
                bs_ = tl.where(better, s_min, bs_)
                bk_ = tl.where(better, k_min, bk_)
                bw_ = tl.where(better, w, bw_)
            # the new token (index num_slots, the highest) while it is alive
            new_worse = (n_tier < bt_) | ((n_tier == bt_) & ((n_key < bs_) | ((n_key == bs_) & (n_pk <= bk_))))
            lose_new = (new_alive > 0) & (new_worse | (bw_ < 0))
            new_alive = tl.where(lose_new, 0, new_alive)
            wblk = tl.load(bt_ptr + b * bt_sb + tl.maximum(bw_, 0) // R).to(tl.int64)
            tl.store(tag_ptr + wblk * tg_sb + h * tg_sh + tl.maximum(bw_, 0) % R, 0, mask=~lose_new & (bw_ >= 0))
            tl.debug_barrier()
        if new_alive > 0:
            free = tl.zeros((), tl.int64) + big
            for s0 in range(first, num_slots, TILE):
                s = s0 + lanes
                own = s < num_slots
                blk = tl.load(bt_ptr + b * bt_sb + s // R, mask=own, other=0).to(tl.int64)
                tags = tl.load(tag_ptr + blk * tg_sb + h * tg_sh + s % R, mask=own, other=1)
                free = tl.minimum(free, tl.min(tl.where(own & (tags == 0), s, big)))
            fslot = tl.minimum(free, num_slots - 1)
            fblk = tl.load(bt_ptr + b * bt_sb + fslot // R).to(tl.int64)
            tl.store(tag_ptr + fblk * tg_sb + h * tg_sh + fslot % R, (pos + 1).to(tl.int32))
            tl.store(score_ptr + fblk * sc_sb + h * sc_sh + fslot % R, new_sc.to(score_ptr.dtype.element_ty))
            d = tl.arange(0, D)
            hi = fblk * hi_sb + h * hi_sh + (fslot % R) * hi_sr + d
            k = tl.load(k_ptr + b * skb + h * skh + d).to(tl.float32)
            v = tl.load(v_ptr + b * svb + h * svh + d).to(tl.float32)
            # quant.finite_inputs, then quant.to_hi (explicit where: compiled min / max may drop NaN)
            k = tl.where(k != k, 0.0, tl.minimum(tl.maximum(tl.minimum(tl.maximum(k, -65504.0), 65504.0), -top), top))
            v = tl.where(v != v, 0.0, tl.minimum(tl.maximum(tl.minimum(tl.maximum(v, -65504.0), 65504.0), -top), top))
            if HI_BF16:
                tl.store(khi_ptr + hi, _bf16_rtne(k))
                tl.store(vhi_ptr + hi, _bf16_rtne(v))
            elif HI_FP8:
                tl.store(khi_ptr + hi, _fp8e4m3_rtne(k))
                tl.store(vhi_ptr + hi, _fp8e4m3_rtne(v))
            else:
                tl.store(khi_ptr + hi, k.to(khi_ptr.dtype.element_ty))
                tl.store(vhi_ptr + hi, v.to(vhi_ptr.dtype.element_ty))


def maintain_hi_tiled(regions, layout, config, block_tables, pos, k_new, v_new, new_mass, tile: int = 128,
                      own_from=None) -> None:
    """Host wrapper (tests): ``upkeep.maintain_hi_decode``'s arguments with ``new_mass [B, H]``,
    k / v as the op set's entry leaves them; ``tile`` slots per tile; ``own_from`` int64 ``[B]``
    (None: all 0)."""
    import torch

    from ..core.importance import hi_budget, recent_window

    r, n = layout.hi_slots, layout.block_size
    if not r or pos.numel() == 0:
        return
    views, dev = layout.views(regions), regions.device
    pos = pos.to(dev, torch.int64)
    length = pos + 1
    own = torch.zeros_like(pos) if own_from is None else torch.as_tensor(own_from, dtype=torch.int64).to(dev)
    budget = hi_budget(config, length, (pos // n + 1 - own) * r).contiguous()
    rstart = (length - recent_window(config, budget)).contiguous()
    seq = length.to(torch.int32).contiguous()
    bt = block_tables.to(dev).contiguous()
    k, v = k_new.contiguous(), v_new.contiguous()
    nm = new_mass.to(dev, torch.float32).contiguous()
    _tiled_upkeep_kernel[(pos.shape[0], regions.shape[1])](
        bt, bt.stride(0), seq, own, budget, rstart, views.tag, views.tag.stride(0), views.tag.stride(1),
        views.score, views.score.stride(0), views.score.stride(1), nm, nm.stride(0),
        views.k_hi, views.v_hi, *views.k_hi.stride()[:3], k, v, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        float(torch.finfo(layout.hi_dtype).max), float(torch.finfo(layout.score_dtype).max), int(config.sink_tokens),
        N=n, R=r, D=layout.head_dim, TILE=tile, HI_BF16=layout.hi_dtype == torch.bfloat16,
        HI_FP8=layout.hi_dtype == torch.float8_e4m3fn, num_warps=4)
