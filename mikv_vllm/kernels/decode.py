"""Decode attention over a batch of paged MiKV requests (one query token each).

Pipeline (``decode_attention``), per layer and step:

1. ``hi_slot_map`` (torch, sync-free scatter): per request and KV head, position ->
   global hi slot ``block * R + r`` (-1 = none) from the tags of the request's
   first ``ceil(ctx / N)`` blocks (tags in ``(0, ctx]`` only, as the reference).
2. ``_split_kernel``, grid (request, KV head, split): all query heads of the KV
   head in one program; each token of ``[0, ctx)`` is read exactly once: its hi
   copy where the map has a slot, else the packed lo codes (keys at ``k_bits``, values at
   ``v_bits``) + (scale, zero) (two fp16, or fp8-scale's three bytes),
   dequantized and multiplied by 1/b (balancer); lo_bits 0 skips untagged
   tokens. Online base-2 softmax; fp32 logits go to a scratch buffer when scores
   are needed. Dots are fp32 (``input_precision="ieee"``) for fp32 queries and
   tensor-core fp16/bf16 (fp32 accumulate) for fp16/bf16 queries.
3. ``_merge_kernel``, grid (request, query head): exact log-sum-exp merge of the
   splits and of the new token's raw K/V (the reference attends the chunk's raw
   K/V), output fp32 and the final (max, sum).
4. ``_mass_kernel`` (``need_mass``), grid (request, KV head, tile): softmax mass per
   position summed over the group's query heads (the reference's position-indexed mass).
5. ``_score_kernel`` (``accumulate``), grid (request, KV head, slot tile): scores live in the
   hi slots (core.layout), so it walks the slots of the request's blocks, not the positions:
   each slot whose tag is a context position (``(0, ctx]``) adds its token's mass (from the
   logits scratch) to its score, saturating as ``reference.accumulate_scores_decode``; no
   other score is touched. The new token holds no slot yet: its mass goes to ``new_mass
   [B, H]`` for the upkeep kernel (its score as a candidate, and the score of its slot if
   promoted). Walking slots (not the slot map) adds to every live slot, duplicates of
   stale tags included, exactly as the reference.
"""

from __future__ import annotations

import torch

from ..core.layout import RegionLayout
from ._common import lo_args, lo_constexprs, next_pow2, sm_count, tl, triton
from .workspace import MAX_SPLITS

LOG2E = 1.4426950408889634


@triton.jit
def _dequant(lo_ptr, sz_ptr, blk, h, off, mask, lo_sb, lo_sh, lo_sn, sz_sb, sz_sh, sz_sn,
             D: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, BLOCK_N: tl.constexpr, FP8S: tl.constexpr):
    """fp32 ``[BLOCK_N, D]`` = zero + code * scale for tokens (blk, off) of KV head h; (scale, zero)
    two fp16, or with FP8S ``quant.pack_meta``'s three bytes (fp16 zero, e5m2 scale)."""
    base = blk * lo_sb + h * lo_sh + off * lo_sn
    if BITS == 8:
        codes = tl.load(lo_ptr + base[:, None] + tl.arange(0, D)[None, :], mask=mask[:, None], other=0)
        codes = codes.to(tl.int32)
    else:  # 8 codes = BITS bytes = one little-endian word
        ci = tl.arange(0, D // 8)
        word = tl.zeros((BLOCK_N, D // 8), tl.int32)
        for i in tl.static_range(BITS):
            byte = tl.load(lo_ptr + base[:, None] + (ci * BITS + i)[None, :], mask=mask[:, None], other=0)
            word = word | (byte.to(tl.int32) << (8 * i))
        codes = (word[:, :, None] >> (tl.arange(0, 8) * BITS)[None, None, :]) & ((1 << BITS) - 1)
    NG: tl.constexpr = D // GS
    zb = blk * sz_sb + h * sz_sh + off * sz_sn
    if FP8S:
        gi = tl.arange(0, NG) * 3
        m = mask[:, None]
        z0 = tl.load(sz_ptr + zb[:, None] + gi[None, :], mask=m, other=0).to(tl.int32)
        z1 = tl.load(sz_ptr + zb[:, None] + gi[None, :] + 1, mask=m, other=0).to(tl.int32)
        s1 = tl.load(sz_ptr + zb[:, None] + gi[None, :] + 2, mask=m, other=0).to(tl.int32)
        zr = (z0 | (z1 << 8)).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        sc = (s1 << 8).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        gi = tl.arange(0, NG) * 2
        sc = tl.load(sz_ptr + zb[:, None] + gi[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
        zr = tl.load(sz_ptr + zb[:, None] + gi[None, :] + 1, mask=mask[:, None], other=0.0).to(tl.float32)
    x = zr[:, :, None] + tl.reshape(codes, (BLOCK_N, NG, GS)).to(tl.float32) * sc[:, :, None]
    return tl.reshape(x, (BLOCK_N, D))


@triton.jit
def _split_kernel(q_ptr, sqb, sqh, bt_ptr, sbtb, ctx_ptr, map_ptr, smb, smh, binv_ptr, sbib, sbih,
                  klo, vlo, lo_sb, lo_sh, klo_sn, vlo_sn, ksz, vsz, sz_sb, sz_sh, sz_sn,
                  khi, vhi, hi_sb, hi_sh, hi_sr, lg_ptr, slgb, slgh,
                  pm_ptr, pl_ptr, psb, psh, pacc_ptr, pab, pah, pas, qk_scale, tps,
                  N: tl.constexpr, R: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                  KB: tl.constexpr, VB: tl.constexpr, GS: tl.constexpr, FP8S: tl.constexpr, BLOCK_N: tl.constexpr,
                  HAS_BAL: tl.constexpr, NEED_LOGITS: tl.constexpr, DOT: tl.constexpr, STEP: tl.constexpr = False):
    """STEP (``step.decode_step``): ``ctx_ptr`` holds seq = ctx + 1 (0: padded row), ``tps`` the
    split count (each row's range is cut on the device), q is sanitized on load and the balancer
    is read from the row's first block (``binv_ptr``: the page's balancer view)."""
    b = tl.program_id(0).to(tl.int64)          # int64 offsets: b * stride overflows int32 at long contexts
    h = tl.program_id(1)
    s = tl.program_id(2)
    if STEP:
        ctx = tl.maximum(tl.load(ctx_ptr + b) - 1, 0)
        tps = tl.maximum((ctx + tps - 1) // tps + BLOCK_N - 1, BLOCK_N) // BLOCK_N * BLOCK_N
    else:
        ctx = tl.load(ctx_ptr + b)
    start = s * tps
    end = tl.minimum(start + tps, ctx)
    g = tl.arange(0, GP)
    gm = g < G
    d = tl.arange(0, D)
    hq = h * G + g
    q = tl.load(q_ptr + b * sqb + hq[:, None] * sqh + d[None, :], mask=gm[:, None], other=0.0)
    if STEP:       # quant.finite_inputs: NaN -> 0, clamped to +-65504 (explicit where: min / max may drop NaN)
        qf = q.to(tl.float32)
        q = tl.where(qf != qf, 0.0, tl.minimum(tl.maximum(qf, -65504.0), 65504.0)).to(q.dtype)
    if DOT != 1:   # fp32 ("ieee") or bf16 queries (tf32: fp32 range, 10-bit mantissa >= bf16's 7)
        q = q.to(tl.float32)
    else:          # fp16 queries (read from an fp32 copy of fp16 values: the rotated decode step)
        q = q.to(tl.float16)
    if HAS_BAL:
        if STEP:   # ``balancer.unbalance_keys``: k_hat * (1 / b), 1 / b correctly rounded
            first = tl.load(bt_ptr + b * sbtb).to(tl.int64)
            binv = tl.math.div_rn(1.0, tl.load(binv_ptr + first * sbib + h * sbih + d).to(tl.float32))
        else:
            binv = tl.load(binv_ptr + b * sbib + h * sbih + d)
    m_i = tl.full((GP,), -float("inf"), tl.float32)
    l_i = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, D), tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pm = pos < end
        blk = tl.load(bt_ptr + b * sbtb + pos // N, mask=pm, other=0).to(tl.int64)
        off = pos % N
        if R > 0:
            slot = tl.load(map_ptr + b * smb + h * smh + pos, mask=pm, other=-1)
            is_hi = slot >= 0
            lo_m = pm & (slot < 0)
        else:
            is_hi = pm & (pos < 0)
            lo_m = pm
        if KB > 0:
            kx = _dequant(klo, ksz, blk, h, off, lo_m, lo_sb, lo_sh, klo_sn, sz_sb, sz_sh, sz_sn, D, KB, GS, BLOCK_N, FP8S)
            vx = _dequant(vlo, vsz, blk, h, off, lo_m, lo_sb, lo_sh, vlo_sn, sz_sb, sz_sh, sz_sn, D, VB, GS, BLOCK_N, FP8S)
            if HAS_BAL:
                kx = kx * binv[None, :]
            ok = pm
        else:
            kx = tl.zeros((BLOCK_N, D), tl.float32)
            vx = tl.zeros((BLOCK_N, D), tl.float32)
            ok = is_hi
        if R > 0:
            hm = (pm & is_hi)[:, None]
            hoff = (slot // R).to(tl.int64) * hi_sb + h * hi_sh + (slot % R) * hi_sr
            kx = tl.where(hm, tl.load(khi + hoff[:, None] + d[None, :], mask=hm, other=0.0).to(tl.float32), kx)
            vx = tl.where(hm, tl.load(vhi + hoff[:, None] + d[None, :], mask=hm, other=0.0).to(tl.float32), vx)
        if DOT == 0:
            qk = tl.dot(q, tl.trans(kx), input_precision="ieee")
        elif DOT == 2:
            qk = tl.dot(q, tl.trans(kx), input_precision="tf32")
        else:  # fp16 tensor cores: clamp so that balanced / bf16-hi keys and values stay finite
            kx = tl.minimum(tl.maximum(kx, -65504.0), 65504.0)
            vx = tl.minimum(tl.maximum(vx, -65504.0), 65504.0)
            qk = tl.dot(q, tl.trans(kx.to(tl.float16)))
        qk = tl.where(ok[None, :], qk * qk_scale, -float("inf"))                 # [GP, BLOCK_N], base 2
        if NEED_LOGITS:
            tl.store(lg_ptr + b * slgb + hq[:, None] * slgh + pos[None, :], qk, mask=gm[:, None] & pm[None, :])
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DOT == 0:
            pv = tl.dot(p, vx, input_precision="ieee")
        elif DOT == 2:
            pv = tl.dot(p, vx, input_precision="tf32")
        else:
            pv = tl.dot(p.to(tl.float16), vx.to(tl.float16))
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    pbase = b * psb + hq * psh + s
    tl.store(pm_ptr + pbase, m_i, mask=gm)
    tl.store(pl_ptr + pbase, l_i, mask=gm)
    tl.store(pacc_ptr + b * pab + hq[:, None] * pah + s * pas + d[None, :], acc, mask=gm[:, None])


@triton.jit
def merge_splits(pm_ptr, pl_ptr, prow, pacc_ptr, arow, pas, n_splits, s_new, vn, d, SP: tl.constexpr):
    """Exact merge of one row's ``n_splits`` split-K partials (running max, normaliser, accumulator at
    ``prow`` / ``arow``) with the new token's logit ``s_new`` and value ``vn`` (base-2 logits):
    (output, max, normaliser, the new token's weight before normalising)."""
    si = tl.arange(0, SP)
    sm = si < n_splits
    ms = tl.load(pm_ptr + prow + si, mask=sm, other=-float("inf"))
    ls = tl.load(pl_ptr + prow + si, mask=sm, other=0.0)
    m = tl.maximum(tl.max(ms, axis=0), s_new)
    w = tl.exp2(ms - m)
    w_new = tl.exp2(s_new - m)
    l_tot = tl.sum(w * ls, axis=0) + w_new
    accs = tl.load(pacc_ptr + arow + si[:, None] * pas + d[None, :], mask=sm[:, None], other=0.0)
    return (tl.sum(w[:, None] * accs, axis=0) + w_new * vn) / l_tot, m, l_tot, w_new


@triton.jit
def _merge_kernel(q_ptr, sqb, sqh, kn_ptr, sknb, sknh, vn_ptr, svnb, svnh, ctx_ptr,
                  pm_ptr, pl_ptr, psb, psh, pacc_ptr, pab, pah, pas, out_ptr, sob, soh,
                  mx_ptr, sm_ptr, lg_ptr, slgb, slgh, qk_scale, tps,
                  G: tl.constexpr, D: tl.constexpr, SP: tl.constexpr, NEED_LOGITS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    hq = tl.program_id(1)
    h = hq // G
    ctx = tl.load(ctx_ptr + b)
    ns = (ctx + tps - 1) // tps
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * sqb + hq * sqh + d).to(tl.float32)
    kn = tl.load(kn_ptr + b * sknb + h * sknh + d).to(tl.float32)
    vn = tl.load(vn_ptr + b * svnb + h * svnh + d).to(tl.float32)
    s_new = tl.sum(q * kn, axis=0) * qk_scale
    o, m, l_tot, w_new = merge_splits(pm_ptr, pl_ptr, b * psb + hq * psh, pacc_ptr, b * pab + hq * pah, pas, ns,
                                      s_new, vn, d, SP)
    tl.store(out_ptr + b * sob + hq * soh + d, o)
    tl.store(mx_ptr + b * tl.num_programs(1) + hq, m)
    tl.store(sm_ptr + b * tl.num_programs(1) + hq, l_tot)
    if NEED_LOGITS:
        tl.store(lg_ptr + b * slgb + hq * slgh + ctx, s_new)


@triton.jit
def _mass_kernel(lg_ptr, slgb, slgh, mx_ptr, sm_ptr, hq_total, ctx_ptr, mass_ptr, smsb, smsh,
                 G: tl.constexpr, GP: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    pos = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    pm = pos <= tl.load(ctx_ptr + b)
    g = tl.arange(0, GP)
    gm = g < G
    hq = h * G + g
    m = tl.load(mx_ptr + b * hq_total + hq, mask=gm, other=0.0)
    inv_l = 1.0 / tl.load(sm_ptr + b * hq_total + hq, mask=gm, other=1.0)
    lg = tl.load(lg_ptr + b * slgb + hq[:, None] * slgh + pos[None, :], mask=gm[:, None] & pm[None, :],
                 other=-float("inf"))
    mass = tl.sum(tl.exp2(lg - m[:, None]) * inv_l[:, None], axis=0)
    tl.store(mass_ptr + b * smsb + h * smsh + pos, mass, mask=pm)


@triton.jit
def _score_kernel(lg_ptr, slgb, slgh, mx_ptr, sm_ptr, hq_total, ctx_ptr, bt_ptr, sbtb,
                  bt_cols, tag_ptr, tg_sb, tg_sh, score_ptr, sc_sb, sc_sh, nm_ptr, snmb, snmh, top,
                  N: tl.constexpr, R: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, BLOCK: tl.constexpr,
                  WRITE_NEW: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    ctx = tl.load(ctx_ptr + b).to(tl.int64)
    s = tl.program_id(2).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)   # slot among the request's blocks
    own = (s < (ctx // N + 1) * R) & (s // R < bt_cols)               # blocks of positions [0, ctx]
    g = tl.arange(0, GP)
    gm = g < G
    hq = h * G + g
    m = tl.load(mx_ptr + b * hq_total + hq, mask=gm, other=0.0)
    inv_l = 1.0 / tl.load(sm_ptr + b * hq_total + hq, mask=gm, other=1.0)
    blk = tl.load(bt_ptr + b * sbtb + s // R, mask=own, other=0).to(tl.int64)
    tags = tl.load(tag_ptr + blk * tg_sb + h * tg_sh + s % R, mask=own, other=0)
    live = own & (tags > 0) & (tags <= ctx)                           # a context position is hi here
    p = tl.where(live, tags - 1, 0).to(tl.int64)
    lg = tl.load(lg_ptr + b * slgb + hq[:, None] * slgh + p[None, :], mask=gm[:, None] & live[None, :],
                 other=-float("inf"))
    mass = tl.sum(tl.exp2(lg - m[:, None]) * inv_l[:, None], axis=0)
    ptr = score_ptr + blk * sc_sb + h * sc_sh + s % R
    cur = tl.load(ptr, mask=live, other=0.0).to(tl.float32)
    tl.store(ptr, tl.minimum(cur + mass, top).to(score_ptr.dtype.element_ty), mask=live)
    if WRITE_NEW:
        if tl.program_id(2) == 0:   # the new token (position ctx): its mass, for the upkeep kernel
            lgn = tl.load(lg_ptr + b * slgb + hq * slgh + ctx, mask=gm, other=-float("inf"))
            tl.store(nm_ptr + b * snmb + h * snmh, tl.sum(tl.exp2(lgn - m) * inv_l, axis=0))


# --------------------------------------------------------------------- host side
def hi_slot_map(regions: torch.Tensor, layout: RegionLayout, block_tables: torch.Tensor, ctx_lens: torch.Tensor,
                max_ctx: int) -> torch.Tensor:
    """int32 ``[B, H, max_ctx]``: global hi slot (``block * R + r``) of each cached position, -1 if none."""
    bsz, h = block_tables.shape[0], regions.shape[1]
    n, r = layout.block_size, layout.hi_slots
    dev = regions.device
    out = torch.full((bsz, h, max_ctx + 1), -1, dtype=torch.int32, device=dev)   # last column: dump
    nb = -(-max_ctx // n)
    if r == 0 or nb == 0:
        return out[:, :, :max_ctx]
    ctx = ctx_lens.to(dev, torch.int64)
    ids = block_tables[:, :nb].to(dev, torch.int64)
    live = torch.arange(nb, device=dev)[None, :] < ((ctx + n - 1) // n)[:, None]   # [B, nb]
    ids = torch.where(live, ids, torch.zeros_like(ids))
    tags = layout.views(regions).tag[ids].long()                                     # [B, nb, H, R]
    ok = (tags > 0) & (tags <= ctx[:, None, None, None]) & live[:, :, None, None]
    idx = torch.where(ok, tags - 1, torch.full_like(tags, max_ctx))
    slot = (ids[:, :, None, None] * r + torch.arange(r, device=dev)).expand_as(tags)
    idx = idx.permute(0, 2, 1, 3).reshape(bsz, h, nb * r)
    slot = slot.permute(0, 2, 1, 3).reshape(bsz, h, nb * r).to(torch.int32)
    out.scatter_(2, idx, slot)
    return out[:, :, :max_ctx]


def default_block_n(device: torch.device, head_dim: int, max_ctx: int) -> int:
    """Tokens per split-kernel tile: 64 / 32 on CUDA; on the interpreter (CPU), whose cost grows
    with the op count rather than the tile size, wider tiles for long contexts."""
    if torch.device(device).type == "cuda":
        return 64 if head_dim <= 64 else 32
    return min(256, max(16, next_pow2(max_ctx // 64)))


def plan_splits(batch: int, heads: int, max_ctx: int, block_n: int, device: torch.device,
                tokens_per_split: int | None = None) -> tuple[int, int]:
    """(tokens per split, number of splits): ~4 programs per SM, at most MAX_SPLITS splits."""
    if tokens_per_split is None:
        want = max(1, min(MAX_SPLITS, -(-4 * sm_count(device) // max(1, batch * heads)), -(-max_ctx // block_n)))
        tokens_per_split = -(-max(1, max_ctx) // want)
    tps = max(block_n, -(-tokens_per_split // block_n) * block_n)
    splits = max(1, -(-max_ctx // tps))
    if splits > MAX_SPLITS:
        tps = -(-max_ctx // (MAX_SPLITS * block_n)) * block_n
        splits = -(-max_ctx // tps)
    return tps, splits


def check_hi_dtype(layout: RegionLayout, device: torch.device) -> None:
    """fp8 hi copies are read as ``tl.float8e4nv``: CUDA needs compute capability 8.9+ (the
    interpreter handles them on CPU). Raises with the alternatives instead of a compiler error."""
    if layout.hi_dtype == torch.float8_e4m3fn and device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            raise RuntimeError(f"hi_dtype float8_e4m3fn on the Triton path needs a GPU of compute capability "
                               f">= 8.9 (this one: {cap[0]}.{cap[1]}); use hi_dtype float16 or MIKV_VLLM_OPS=torch")


def decode_attention(regions: torch.Tensor, layout: RegionLayout, block_tables: torch.Tensor,
                     ctx_lens: torch.Tensor, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                     scale: float, balancer: torch.Tensor | None = None, *, max_ctx: int | None = None,
                     need_mass: bool = True, accumulate: bool = False, new_mass: torch.Tensor | None = None,
                     tokens_per_split: int | None = None, block_n: int | None = None,
                     num_warps: int | None = None,
                     hi_map: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Batched decode step, semantics of ``reference.gather_context`` + ``reference.attention`` (T = 1).

    q ``[B, Hq, D]`` (position ``ctx_lens[b]``), k_new/v_new ``[B, H, D]`` raw, block_tables
    ``[B, >= ceil((ctx + 1)/N)]`` with ``accumulate`` (else ``>= ceil(ctx/N)``), balancer
    ``[B, H, D]`` stored values (fp32) or None. Returns ``out [B, Hq, D]`` fp32 and, when
    ``need_mass``, ``mass [B, H, max_ctx + 1]`` (zero past ``ctx_lens[b]``). ``accumulate`` adds
    the mass of every hi token to its slot's score (``reference.accumulate_scores_decode``; the
    tags of the block of position ``ctx`` must already be reset if ``ctx`` is its offset 0, as the
    store does) and writes the new token's mass to ``new_mass`` (``[B, H]`` fp32, when given).
    ``max_ctx`` (>= every ctx; avoids a device sync), ``hi_map`` (a precomputed :func:`hi_slot_map`),
    ``tokens_per_split`` / ``block_n`` / ``num_warps`` are launch tuning knobs.
    """
    bsz, hq, d = q.shape
    h = k_new.shape[1]
    dev = regions.device
    ctx_t = torch.as_tensor(ctx_lens, device=dev).to(torch.int32).contiguous()
    if max_ctx is None:
        max_ctx = int(ctx_t.max().item()) if bsz else 0
    grp, r = hq // h, layout.hi_slots
    if r:
        check_hi_dtype(layout, dev)
    need_mass = need_mass and r > 0
    accumulate = accumulate and r > 0
    logits = need_mass or accumulate
    if block_n is None:
        block_n = default_block_n(dev, d, max_ctx)
    tps, splits = plan_splits(bsz, h, max_ctx, block_n, dev, tokens_per_split)
    views = layout.views(regions)
    bt = block_tables.to(dev, torch.int32)
    bt = bt if bt.dim() == 2 else bt[None]
    bt = bt if bt.shape[1] else torch.zeros(bsz, 1, dtype=torch.int32, device=dev)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_new, v_new = (x if x.stride(-1) == 1 else x.contiguous() for x in (k_new, v_new))
    dot = {torch.float16: 1, torch.bfloat16: 2}.get(q.dtype, 0)   # see _split_kernel
    if dot == 0 and q.dtype != torch.float32:
        q = q.float()
    if r and hi_map is None:
        hi_map = hi_slot_map(regions, layout, bt, ctx_t, max_ctx)
    hmap = hi_map if r else ctx_t.view(1, 1, -1)
    binv = (1.0 / balancer.to(dev, torch.float32)).contiguous() if balancer is not None else None
    bi = binv if binv is not None else q
    hi_k, hi_v = (views.k_hi, views.v_hi) if r else (regions, regions)
    lcap = max_ctx + 1
    lg = torch.empty(bsz, hq, lcap if logits else 1, device=dev, dtype=torch.float32)
    pmax = torch.empty(bsz, hq, splits, device=dev, dtype=torch.float32)
    psum = torch.empty_like(pmax)
    pacc = torch.empty(bsz, hq, splits, d, device=dev, dtype=torch.float32)
    qk_scale = float(scale) * LOG2E
    gp = max(16, next_pow2(grp))
    nw = num_warps or 4
    if bsz and splits:
        _split_kernel[(bsz, h, splits)](
            q, q.stride(0), q.stride(1), bt, bt.stride(0), ctx_t, hmap, hmap.stride(0), hmap.stride(1),
            bi, bi.stride(0), bi.stride(1), *lo_args(layout, views, regions),
            hi_k, hi_v, *hi_k.stride()[:3], lg, lg.stride(0), lg.stride(1),
            pmax, psum, pmax.stride(0), pmax.stride(1), pacc, pacc.stride(0), pacc.stride(1), pacc.stride(2),
            qk_scale, tps, N=layout.block_size, R=r, G=grp, GP=gp, D=d, **lo_constexprs(layout),
            BLOCK_N=block_n, HAS_BAL=binv is not None, NEED_LOGITS=logits, DOT=dot, num_warps=nw)
    out = torch.empty(bsz, hq, d, device=dev, dtype=torch.float32)
    mx = torch.empty(bsz, hq, device=dev, dtype=torch.float32)
    sm = torch.empty_like(mx)
    if bsz:
        _merge_kernel[(bsz, hq)](
            q, q.stride(0), q.stride(1), k_new, k_new.stride(0), k_new.stride(1), v_new, v_new.stride(0),
            v_new.stride(1), ctx_t, pmax, psum, pmax.stride(0), pmax.stride(1), pacc, pacc.stride(0),
            pacc.stride(1), pacc.stride(2), out, out.stride(0), out.stride(1), mx, sm, lg, lg.stride(0),
            lg.stride(1), qk_scale, tps, G=grp, D=d, SP=max(2, next_pow2(splits)), NEED_LOGITS=logits,
            num_warps=4)
    mass = torch.zeros(bsz, h, lcap, device=dev, dtype=torch.float32) if need_mass else None
    gp2 = max(2, next_pow2(grp))
    if need_mass and bsz:
        blk = 128 if dev.type == "cuda" else min(4096, max(32, next_pow2(lcap // 8)))
        _mass_kernel[(bsz, h, -(-lcap // blk))](
            lg, lg.stride(0), lg.stride(1), mx, sm, hq, ctx_t, mass, mass.stride(0), mass.stride(1),
            G=grp, GP=gp2, BLOCK=blk, num_warps=4)
    if accumulate and bsz:
        slots = (max_ctx // layout.block_size + 1) * r            # slots of the longest request's blocks
        blk = 128 if dev.type == "cuda" else min(4096, max(16, next_pow2(slots)))
        nm = new_mass if new_mass is not None else out
        if new_mass is not None and (new_mass.shape != (bsz, h) or new_mass.dtype != torch.float32):
            raise ValueError(f"new_mass must be fp32 [{bsz}, {h}], got {new_mass.dtype} {tuple(new_mass.shape)}")
        _score_kernel[(bsz, h, -(-slots // blk))](
            lg, lg.stride(0), lg.stride(1), mx, sm, hq, ctx_t, bt, bt.stride(0), bt.shape[1],
            views.tag, views.tag.stride(0), views.tag.stride(1), views.score, views.score.stride(0),
            views.score.stride(1), nm, nm.stride(0), nm.stride(1), float(torch.finfo(layout.score_dtype).max),
            N=layout.block_size, R=r, G=grp, GP=gp2, BLOCK=blk, WRITE_NEW=new_mass is not None, num_warps=4)
    return out, mass
