"""The decode step as a fixed set of Triton launches on the step plan (CUDA-graph capturable).

One layer's decode of B one-token rows is six launches and no torch op (:func:`decode_step`):

1. ``_row_store_kernel`` (row, KV head): q / k / v sanitized on load (``quant.finite_inputs``),
   the balancer computed from the row's own q / k at position 0 and stored in its first block, else
   loaded (``ops.torch_decode.decode_balancer``), K*b / V quantized into the lo tier at their own
   widths and group metadata (``store``'s ``_quant_pack_store``), the block's tags reset at offset 0;
   with ``rotate`` the row's q / k / v are first rotated (``rotate.py``) into the buffers that the
   later kernels read;
2. ``_map_kernel`` (row, KV head): the row's positions -> hi slot map, refilled (``decode.hi_slot_map``;
   a shared prefix block's hi copy only for a tag <= the row's ``shared_hi``);
3. ``decode._split_kernel`` (row, KV head, split): split-K attention over both tiers, ``SPLITS``
   fixed at start-up, each row's context cut into SPLITS equal tile-aligned ranges on the device;
4. ``_step_merge_kernel`` (row, query head): exact log-sum-exp merge with the new token, (max, sum) and
   the new token's probability per query head; with ``rotate`` the output rotated back;
5. ``_slot_score_kernel`` (row, KV head, slot tile): every live hi slot's logit recomputed from its hi
   copy (no logits scratch), its mass added to its score (saturating, NaN kept as the reference),
   the new token's mass summed over the group; the row's owned blocks only;
6. ``upkeep_tiled._tiled_upkeep_kernel`` (row, KV head): the hi-set upkeep, tiled over the slots
   of the row's owned blocks with a constant tile.

Every grid and buffer is sized by bounds fixed when the :class:`DecodeBuffers` are made (rows
per step, KV / query heads, head dim, positions per row, splits): nothing depends on this step's
data, nothing is read back to the host, nothing is allocated per call. A row whose ``seq`` is 0
(vLLM's padding of a captured batch) is a no-op in every kernel: no page byte is written. A row
reading shared prefix blocks (``own`` > 0, prefix caching: docs/design.md "Shared blocks") writes
nothing into them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import MiKVConfig
from ..core.balancer import B_MAX, B_MIN
from ..core.importance import hi_budget, recent_window
from ..core.layout import RegionLayout
from ..core.rotation import rotation_for
from ._common import lo_args, lo_constexprs, next_pow2, tl, triton
from .decode import LOG2E, _split_kernel, check_hi_dtype, default_block_n, merge_splits
from .rotate import rotate_rows, rotate_vector, store_unrotated
from .store import _quant_pack_store
from .upkeep_tiled import _tiled_upkeep_kernel

FP16_MAX = 65504.0


@triton.jit
def _finite(x):
    """fp32 ``x`` as ``quant.finite_inputs`` leaves it: NaN -> 0, clamped to +-65504 (explicit
    ``where`` on the original value: compiled min / max may drop NaN)."""
    return tl.where(x != x, 0.0, tl.minimum(tl.maximum(x, -65504.0), 65504.0))


@triton.jit
def _row_store_kernel(seq_ptr, bt_ptr, sbtb, q_ptr, sqb, sqh, k_ptr, skb, skh, v_ptr, svb, svh,
                      bal_ptr, bal_sb, bal_sh, klo, vlo, lo_sb, lo_sh, klo_sn, vlo_sn, ksz, vsz, sz_sb, sz_sh, sz_sn,
                      tag_ptr, tg_sb, tg_sh, b_min, b_max, rot_ptr, qr_ptr, qr_sb, qr_sh, kr_ptr, vr_ptr, kr_sb, kr_sh,
                      N: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, KB: tl.constexpr,
                      VB: tl.constexpr, GS: tl.constexpr, FP8S: tl.constexpr, R: tl.constexpr, RP: tl.constexpr,
                      HAS_BAL: tl.constexpr, ROT: tl.constexpr, RC: tl.constexpr, RND: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    seq = tl.load(seq_ptr + b)
    if seq > 0:                                          # seq 0: a padded row, no-op
        pos = (seq - 1).to(tl.int64)
        blk = tl.load(bt_ptr + b * sbtb + pos // N).to(tl.int64)
        off = pos % N
        d = tl.arange(0, D)
        if ROT:   # rotate.py: q / k / v times R, as Rotation.rotate; left in the buffers for the later kernels
            g = tl.arange(0, GP)
            qrot = rotate_rows(q_ptr + b * sqb, (h * G + g) * sqh, g < G, rot_ptr, D, GP, RC, RND)
            k_in = rotate_vector(k_ptr + b * skb + h * skh, rot_ptr, D, RC, RND)
            v_in = rotate_vector(v_ptr + b * svb + h * svh, rot_ptr, D, RC, RND)
            tl.store(qr_ptr + b * qr_sb + (h * G + g)[:, None] * qr_sh + d[None, :], qrot, mask=(g < G)[:, None])
            tl.store(kr_ptr + b * kr_sb + h * kr_sh + d, k_in)
            tl.store(vr_ptr + b * kr_sb + h * kr_sh + d, v_in)
        if R > 0:
            ri = tl.arange(0, RP)
            tl.store(tag_ptr + blk * tg_sb + h * tg_sh + ri, tl.zeros((RP,), tl.int32), mask=(ri < R) & (ri + off == ri))
        if KB > 0:
            if ROT:
                k, v = _finite(k_in), _finite(v_in)
            else:
                k = _finite(tl.load(k_ptr + b * skb + h * skh + d).to(tl.float32))
                v = _finite(tl.load(v_ptr + b * svb + h * svh + d).to(tl.float32))
            if HAS_BAL:
                first = tl.load(bt_ptr + b * sbtb).to(tl.int64)
                baddr = bal_ptr + first * bal_sb + h * bal_sh + d
                if pos == 0:                              # core.balancer.compute_balancer + to_storage
                    g = tl.arange(0, GP)
                    if ROT:
                        qg = qrot
                    else:
                        qg = tl.load(q_ptr + b * sqb + (h * G + g)[:, None] * sqh + d[None, :], mask=(g < G)[:, None],
                                     other=0.0).to(tl.float32)
                    qmax = tl.max(tl.abs(_finite(qg)), axis=0)
                    kmax = tl.abs(k)
                    ok = (qmax > 0) & (kmax > 0)
                    ratio = tl.where(ok, tl.math.div_rn(qmax, tl.where(ok, kmax, 1.0)), 1.0)
                    bb = tl.math.sqrt_rn(ratio)
                    bb = tl.where((bb > 0) & (bb < float("inf")), bb, 1.0)
                    bb = tl.minimum(tl.maximum(bb, b_min), b_max)
                    tl.store(baddr, bb.to(tl.float16))
                k = k * tl.load(baddr).to(tl.float32)
            lo = blk * lo_sb + h * lo_sh
            sz = blk * sz_sb + h * sz_sh + off * sz_sn
            _quant_pack_store(k, klo + lo + off * klo_sn, ksz + sz, D, KB, GS, FP8S)
            _quant_pack_store(v, vlo + lo + off * vlo_sn, vsz + sz, D, VB, GS, FP8S)


@triton.jit
def _map_kernel(seq_ptr, own_ptr, shi_ptr, bt_ptr, sbtb, tag_ptr, tg_sb, tg_sh, map_ptr, smb, smh,
                N: tl.constexpr, R: tl.constexpr, FILL: tl.constexpr, SB: tl.constexpr):
    """map[b, h, p] = global hi slot of position p < ctx, -1 when none (``decode.hi_slot_map``); a
    shared block's slot (block column < ``own``) counts only with a tag <= ``shi`` (docs/design.md,
    "Shared blocks")."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    ctx = (tl.load(seq_ptr + b) - 1).to(tl.int64)
    base = map_ptr + b * smb + h * smh
    for p0 in range(0, ctx, FILL):
        p = p0 + tl.arange(0, FILL)
        tl.store(base + p, tl.full((FILL,), -1, tl.int32), mask=p < ctx)
    tl.debug_barrier()
    nslots = (ctx + N - 1) // N * R                      # slots of the blocks of positions [0, ctx)
    own_slot = tl.load(own_ptr + b) * R                  # first slot of the owned blocks
    shi = tl.load(shi_ptr + b)
    for s0 in range(0, nslots, SB):
        s = s0 + tl.arange(0, SB)
        m = s < nslots
        blk = tl.load(bt_ptr + b * sbtb + s // R, mask=m, other=0).to(tl.int64)
        tag = tl.load(tag_ptr + blk * tg_sb + h * tg_sh + s % R, mask=m, other=0)
        ok = m & (tag > 0) & (tag <= tl.where(s < own_slot, tl.minimum(ctx, shi), ctx))
        tl.store(base + tl.where(ok, tag - 1, 0), (blk * R + s % R).to(tl.int32), mask=ok)


@triton.jit
def _step_merge_kernel(q_ptr, sqb, sqh, kn_ptr, sknb, sknh, vn_ptr, svnb, svnh, seq_ptr,
                  pm_ptr, pl_ptr, psb, psh, pacc_ptr, pab, pah, pas, out_ptr, sob, soh,
                  mx_ptr, sm_ptr, pn_ptr, hq_total, qk_scale, rot_ptr,
                  G: tl.constexpr, D: tl.constexpr, SP: tl.constexpr, SPLITS: tl.constexpr, ROT: tl.constexpr,
                  RC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    hq = tl.program_id(1)
    h = hq // G
    d = tl.arange(0, D)
    seq = tl.load(seq_ptr + b)
    if seq > 0:
        q = _finite(tl.load(q_ptr + b * sqb + hq * sqh + d).to(tl.float32))
        kn = _finite(tl.load(kn_ptr + b * sknb + h * sknh + d).to(tl.float32))
        vn = _finite(tl.load(vn_ptr + b * svnb + h * svnh + d).to(tl.float32))
        s_new = tl.sum(q * kn, axis=0) * qk_scale           # finite: so is the merged max
        o, m, l_tot, w_new = merge_splits(pm_ptr, pl_ptr, b * psb + hq * psh, pacc_ptr, b * pab + hq * pah, pas,
                                          SPLITS, s_new, vn, d, SP)
        if ROT:   # back from the rotated value space (Rotation.unrotate)
            store_unrotated(out_ptr + b * sob + hq * soh, o, rot_ptr, D, RC)
        else:
            tl.store(out_ptr + b * sob + hq * soh + d, o)
        tl.store(mx_ptr + b * hq_total + hq, m)
        tl.store(sm_ptr + b * hq_total + hq, l_tot)
        tl.store(pn_ptr + b * hq_total + hq, w_new / l_tot)
    else:
        tl.store(out_ptr + b * sob + hq * soh + d, tl.zeros((D,), tl.float32))


@triton.jit
def _slot_score_kernel(q_ptr, sqb, sqh, seq_ptr, own_ptr, mx_ptr, sm_ptr, pn_ptr, hq_total, bt_ptr, sbtb,
                  tag_ptr, tg_sb, tg_sh, score_ptr, sc_sb, sc_sh, khi, hi_sb, hi_sh, hi_sr, nm_ptr, snmb, qk_scale, top,
                  N: tl.constexpr, R: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                  BLOCK: tl.constexpr, DOT: tl.constexpr):
    """``reference.accumulate_scores_decode`` on the slots: each slot whose tag is a context
    position adds that position's mass (its logit recomputed from the slot's hi copy, as the split
    kernel read it) to its score; only the slots of the owned blocks (column >= ``own``): a shared
    block's scores are its writer's. The new token's mass goes to ``nm [B, H]``."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    t = tl.program_id(2)
    seq = tl.load(seq_ptr + b).to(tl.int64)
    ctx = seq - 1
    nslots = tl.where(seq > 0, (ctx // N + 1) * R, 0)    # blocks of positions [0, ctx]
    s = t.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    own = (s < nslots) & (s >= tl.load(own_ptr + b) * R)
    g = tl.arange(0, GP)
    gm = g < G
    hq = h * G + g
    if tl.sum(own.to(tl.int32)) > 0:
        d = tl.arange(0, D)
        q = _finite(tl.load(q_ptr + b * sqb + hq[:, None] * sqh + d[None, :], mask=gm[:, None],
                            other=0.0).to(tl.float32))
        if DOT == 1:
            q = q.to(tl.float16)
        m = tl.load(mx_ptr + b * hq_total + hq, mask=gm, other=0.0)
        inv_l = 1.0 / tl.load(sm_ptr + b * hq_total + hq, mask=gm, other=1.0)
        blk = tl.load(bt_ptr + b * sbtb + s // R, mask=own, other=0).to(tl.int64)
        tags = tl.load(tag_ptr + blk * tg_sb + h * tg_sh + s % R, mask=own, other=0)
        live = own & (tags > 0) & (tags <= ctx)
        hoff = blk * hi_sb + h * hi_sh + (s % R) * hi_sr
        kx = tl.load(khi + hoff[:, None] + d[None, :], mask=live[:, None], other=0.0).to(tl.float32)
        if DOT == 0:
            qk = tl.dot(q, tl.trans(kx), input_precision="ieee")
        elif DOT == 2:
            qk = tl.dot(q, tl.trans(kx), input_precision="tf32")
        else:
            kx = tl.minimum(tl.maximum(kx, -65504.0), 65504.0)
            qk = tl.dot(q, tl.trans(kx.to(tl.float16)))
        lg = tl.where(gm[:, None] & live[None, :], qk * qk_scale, -float("inf"))
        mass = tl.sum(tl.exp2(lg - m[:, None]) * inv_l[:, None], axis=0)
        ptr = score_ptr + blk * sc_sb + h * sc_sh + s % R
        cur = tl.load(ptr, mask=live, other=0.0).to(tl.float32)
        new = cur + mass
        new = tl.where(new > top, top, new)               # saturate; NaN stays NaN (ranked last by the upkeep)
        tl.store(ptr, new.to(score_ptr.dtype.element_ty), mask=live)
    if (t == 0) & (seq > 0):
        pn = tl.load(pn_ptr + b * hq_total + hq, mask=gm, other=0.0)
        tl.store(nm_ptr + b * snmb + h, tl.sum(pn, axis=0))


# --------------------------------------------------------------------- host side
@dataclass
class DecodeBuffers:
    """Every device buffer of the decode step, allocated once from the engine's bounds."""

    rows: int
    splits: int
    block_n: int
    max_pos: int
    seq: torch.Tensor       # int32 [rows]: context + 1 per row, 0 = padded
    budget: torch.Tensor    # int64 [rows]
    rstart: torch.Tensor    # int64 [rows]
    own: torch.Tensor       # int64 [rows]: first owned block (0: nothing shared)
    shi: torch.Tensor       # int64 [rows]: largest tag read from the shared blocks (core.page.shared_hi_limit)
    hi_map: torch.Tensor    # int32 [rows, H, max_pos] (or [1, 1, 1] without hi slots)
    pmax: torch.Tensor      # fp32 [rows, Hq, splits]
    psum: torch.Tensor
    pacc: torch.Tensor      # fp32 [rows, Hq, splits, D]
    mx: torch.Tensor        # fp32 [rows, Hq]
    sm: torch.Tensor
    pnew: torch.Tensor      # fp32 [rows, Hq]: the new token's probability
    new_mass: torch.Tensor  # fp32 [rows, H]
    out: torch.Tensor       # fp32 [rows, Hq, D]
    rot: torch.Tensor | None = None   # fp32 [D, D]: core.rotation's matrix (rotated configs only)
    qr: torch.Tensor | None = None    # fp32 [rows, Hq, D]: the rotated q (rounded to the input dtype)
    kr: torch.Tensor | None = None    # fp32 [rows, H, D]: the rotated k
    vr: torch.Tensor | None = None    # fp32 [rows, H, D]: the rotated v

    @staticmethod
    def make(layout: RegionLayout, num_heads: int, num_kv_heads: int, rows: int, max_pos: int,
             device: torch.device | str, splits: int | None = None, rotation: bool = False) -> "DecodeBuffers":
        """Buffers for ``rows`` rows of at most ``max_pos`` positions each (the block-table width
        times the block size); ``splits`` (default: up to 16, one tile each at least) fixes the grid;
        ``rotation``: also the rotation matrix and the rotated q / k / v (:func:`decode_step`'s ``rotate``)."""
        dev = torch.device(device)
        d, hq, h = layout.head_dim, num_heads, num_kv_heads
        block_n = default_block_n(dev, d, max_pos)
        splits = splits or max(1, min(MAX_STEP_SPLITS, -(-max_pos // block_n)))
        f32 = dict(device=dev, dtype=torch.float32)
        r = layout.hi_slots
        return DecodeBuffers(
            rows, splits, block_n, max_pos,
            seq=torch.zeros(rows, device=dev, dtype=torch.int32),
            budget=torch.zeros(rows, device=dev, dtype=torch.int64),
            rstart=torch.zeros(rows, device=dev, dtype=torch.int64),
            own=torch.zeros(rows, device=dev, dtype=torch.int64), shi=torch.zeros(rows, device=dev, dtype=torch.int64),
            hi_map=torch.full((rows, h, max_pos) if r else (1, 1, 1), -1, device=dev, dtype=torch.int32),
            pmax=torch.zeros(rows, hq, splits, **f32), psum=torch.zeros(rows, hq, splits, **f32),
            pacc=torch.zeros(rows, hq, splits, d, **f32), mx=torch.zeros(rows, hq, **f32),
            sm=torch.ones(rows, hq, **f32), pnew=torch.zeros(rows, hq, **f32), new_mass=torch.zeros(rows, h, **f32),
            out=torch.zeros(rows, hq, d, **f32),
            **(dict(rot=rotation_for(d).matrix.to(dev), qr=torch.zeros(rows, hq, d, **f32),
                    kr=torch.zeros(rows, h, d, **f32), vr=torch.zeros(rows, h, d, **f32)) if rotation else {}))

    def fill(self, layout: RegionLayout, config: MiKVConfig, pos: torch.Tensor, own_from: torch.Tensor | None = None,
             shared_hi: torch.Tensor | None = None) -> None:
        """Once per step (outside the layers): each row's position ``pos`` (int64, host; -1 = a padded
        row), its first owned block ``own_from`` and shared hi bound ``shared_hi`` (int64, host; None:
        nothing shared), with its hi budget (counting the owned slots only) and recent-window start,
        computed on the host and copied into the device buffers (no device allocation, no read of
        device data)."""
        b = pos.shape[0]
        if b > self.rows:
            raise ValueError(f"MiKV decode step: {b} rows exceed the {self.rows} rows the buffers were sized for")
        if pos.device.type != "cpu":
            raise ValueError("DecodeBuffers.fill takes the host positions of the step plan")
        length = torch.zeros(self.rows, dtype=torch.int64)
        length[:b] = pos + 1
        own, shi = torch.zeros(self.rows, dtype=torch.int64), torch.zeros(self.rows, dtype=torch.int64)
        if own_from is not None:
            own[:b], shi[:b] = own_from, shared_hi
        self.seq.copy_(length, non_blocking=True)
        self.own.copy_(own, non_blocking=True)
        self.shi.copy_(shi, non_blocking=True)
        if layout.hi_slots:
            owned = ((length - 1).clamp(min=0) // layout.block_size + 1 - own).clamp(min=0) * layout.hi_slots
            budget = hi_budget(config, length, owned)
            self.budget.copy_(budget, non_blocking=True)
            self.rstart.copy_(length - recent_window(config, budget), non_blocking=True)


MAX_STEP_SPLITS = 16
UPKEEP_TILE: int | None = None   # slots per upkeep tile (None: 128 on CUDA); tests set it small


def decode_buffer_bytes(num_heads: int, num_kv_heads: int, head_dim: int, rows: int, max_pos: int,
                        hi_slots: bool = True, rotation: bool = False) -> int:
    """Upper bound of :meth:`DecodeBuffers.make`'s bytes (splits <= 16): what the engine's memory
    profile must leave free for them (``backend``: reserved in the profiling run)."""
    per_row = 4 * 5 * 8 + num_heads * (MAX_STEP_SPLITS * (head_dim + 2) + head_dim + 3) * 4 + num_kv_heads * 4
    rot = (head_dim * head_dim + rows * (num_heads + 2 * num_kv_heads) * head_dim) * 4 if rotation else 0
    return rows * (per_row + (num_kv_heads * max_pos * 4 if hi_slots else 0)) + rot


_VIEWS: dict = {}


def _views(regions: torch.Tensor, layout: RegionLayout):
    """The typed views of a layer's page (made once per cache tensor: no view op per step)."""
    key = (regions.data_ptr(), tuple(regions.shape), layout)
    views = _VIEWS.get(key)
    if views is None:
        if len(_VIEWS) > 4096:
            _VIEWS.clear()
        views = _VIEWS[key] = layout.views(regions)
    return views


def decode_step(regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, buf: DecodeBuffers,
                block_table: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                scale: float, rotate: bool = False) -> torch.Tensor:
    """One layer's decode of ``B = q.shape[0]`` rows at ``buf.seq[:B] - 1`` (see module doc).
    ``block_table`` int32 ``[B, >= buf.max_pos // N]`` (columns past a row's blocks unread).
    Returns ``buf.out[:B]`` (fp32 ``[B, Hq, D]``; rows of padding are zeros), valid until the next
    call. ``rotate`` (buffers made with ``rotation``): q / k / v are the model's, rotated in the
    store kernel (``rotate.py``), and the output is rotated back in the merge kernel."""
    bsz, hq, d = q.shape
    h = k.shape[1]
    if bsz == 0:
        return buf.out[:0]
    views = _views(regions, layout)
    n, r, grp = layout.block_size, layout.hi_slots, hq // h
    if r:
        check_hi_dtype(layout, regions.device)
    dot = {torch.float16: 1, torch.bfloat16: 2}.get(q.dtype, 0)
    gp = max(16, next_pow2(grp))
    bal = views.balancer if layout.has_balancer else regions
    lo = lo_args(layout, views, regions)
    lo_c = lo_constexprs(layout)
    tag = views.tag if r else regions
    hi_k, hi_v = (views.k_hi, views.v_hi) if r else (regions, regions)
    bt, seq = block_table, buf.seq
    if rotate and buf.rot is None:
        raise ValueError("decode_step(rotate=True) needs DecodeBuffers made with rotation=True")
    rot, qr, kr, vr = (buf.rot, buf.qr, buf.kr, buf.vr) if rotate else (q, q, k, v)
    rc = min(d, 32)
    _row_store_kernel[(bsz, h)](
        seq, bt, bt.stride(0), q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), v, v.stride(0), v.stride(1),
        bal, bal.stride(0), bal.stride(1), *lo, tag, tag.stride(0), tag.stride(1), B_MIN, B_MAX,
        rot, qr, qr.stride(0), qr.stride(1), kr, vr, kr.stride(0), kr.stride(1),
        N=n, G=grp, GP=gp, D=d, **lo_c, R=r, RP=max(1, next_pow2(r)), HAS_BAL=layout.has_balancer,
        ROT=rotate, RC=rc, RND=dot, num_warps=1, enable_fp_fusion=False)
    q, k, v = qr, kr, vr      # the later kernels read the rotated copies (rotate) or the inputs
    hmap = buf.hi_map
    if r:
        fill = 1024 if regions.device.type == "cuda" else min(4096, next_pow2(buf.max_pos))
        _map_kernel[(bsz, h)](seq, buf.own, buf.shi, bt, bt.stride(0), tag, tag.stride(0), tag.stride(1), hmap,
                              hmap.stride(0), hmap.stride(1), N=n, R=r, FILL=fill,
                              SB=max(16, min(1024, next_pow2(buf.max_pos // n * r))), num_warps=4)
    # the split kernel's per-row range: ctx cut into `splits` tile-aligned parts (tps < 0: per row)
    qk_scale = float(scale) * LOG2E
    _split_kernel[(bsz, h, buf.splits)](
        q, q.stride(0), q.stride(1), bt, bt.stride(0), seq, hmap, hmap.stride(0), hmap.stride(1),
        bal, bal.stride(0), bal.stride(1), *lo, hi_k, hi_v, *hi_k.stride()[:3], buf.pmax, 0, 0,
        buf.pmax, buf.psum, buf.pmax.stride(0), buf.pmax.stride(1), buf.pacc, buf.pacc.stride(0),
        buf.pacc.stride(1), buf.pacc.stride(2), qk_scale, buf.splits,
        N=n, R=r, G=grp, GP=gp, D=d, **lo_c, BLOCK_N=buf.block_n,
        HAS_BAL=layout.has_balancer, NEED_LOGITS=False, DOT=dot, STEP=True, num_warps=4)
    out = buf.out
    _step_merge_kernel[(bsz, hq)](
        q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), v, v.stride(0), v.stride(1), seq,
        buf.pmax, buf.psum, buf.pmax.stride(0), buf.pmax.stride(1), buf.pacc, buf.pacc.stride(0),
        buf.pacc.stride(1), buf.pacc.stride(2), out, out.stride(0), out.stride(1), buf.mx, buf.sm, buf.pnew, hq,
        qk_scale, rot, G=grp, D=d, SP=max(2, next_pow2(buf.splits)), SPLITS=buf.splits, ROT=rotate, RC=rc,
        num_warps=4)
    if r:
        slots = (buf.max_pos // n + 1) * r
        blk = 128 if regions.device.type == "cuda" else max(16, min(1024, next_pow2(slots)))
        gp2 = max(16, next_pow2(grp))
        _slot_score_kernel[(bsz, h, -(-slots // blk))](
            q, q.stride(0), q.stride(1), seq, buf.own, buf.mx, buf.sm, buf.pnew, hq, bt, bt.stride(0), tag,
            tag.stride(0), tag.stride(1), views.score, views.score.stride(0), views.score.stride(1), hi_k,
            *hi_k.stride()[:3], buf.new_mass, buf.new_mass.stride(0), qk_scale, float(torch.finfo(layout.score_dtype).max),
            N=n, R=r, G=grp, GP=gp2, D=d, BLOCK=blk, DOT=dot, num_warps=4)
        nm = buf.new_mass
        tile = UPKEEP_TILE or (128 if regions.device.type == "cuda" else max(16, min(256, next_pow2(slots))))
        _tiled_upkeep_kernel[(bsz, h)](
            bt, bt.stride(0), seq, buf.own, buf.budget, buf.rstart, tag, tag.stride(0), tag.stride(1),
            views.score, views.score.stride(0), views.score.stride(1), nm, nm.stride(0),
            hi_k, hi_v, *hi_k.stride()[:3], k, v, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            float(torch.finfo(layout.hi_dtype).max), float(torch.finfo(layout.score_dtype).max),
            int(config.sink_tokens), N=n, R=r, D=d, TILE=tile, HI_BF16=layout.hi_dtype == torch.bfloat16,
            HI_FP8=layout.hi_dtype == torch.float8_e4m3fn, num_warps=4)
    return out[:bsz]
