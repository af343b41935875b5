"""Reference (pure torch, fp32) page operations of the MiKV cache.

``regions`` is one layer's cache as flat bytes ``[num_blocks, H, region_bytes]``
(uint8, see :func:`layout.as_regions`); ``block_row`` is a request's 1-D block
table row: token p lives in block ``block_row[p // N]`` at offset ``p % N``.
Only the first ``ceil(L / N)`` entries of the row are ever touched.

Per request and chunk (``T`` new tokens at positions ``[ctx_len, ctx_len + T)``,
``L = ctx_len + T``), :func:`forward_request` runs, in the order of
docs/design.md:

1. balancer: computed from the chunk when ``ctx_len == 0`` and stored in the
   header of ``block_row[0]``; read from there otherwise
   (:func:`load_balancer` / :func:`store_balancer`).
2. :func:`write_tokens` - lo copies of the new K*b and V, scores 0, R tags of
   every block whose offset 0 is written reset.
3. :func:`gather_context` + :func:`attention` - cached tokens read their hi copy
   if tagged, else the dequantized lo copy (K / b); the chunk uses raw K/V.
4. :func:`accumulate_scores` - softmax mass of the voting rows
   (:func:`first_voting_row`) added to every token's score.
5. :func:`maintain_hi` - hi-set selection (core.importance), demotion by tag
   clearing, promotion of selected new tokens into free slots of any block.

Steps 4-5 are skipped when the layout has no hi slots (rtn). All maths is fp32;
returned outputs are fp32 (callers cast).

Kernel contract (mikv_vllm.kernels must match these signatures/semantics):

* ``write_tokens(regions, layout, block_row, start, k, v, balancer=None)``
* ``gather_context(regions, layout, block_row, ctx_len, balancer=None) -> (k [H,L,D], v [H,L,D], valid [H,L])``
* ``attention(q, k_ctx, v_ctx, valid_ctx, k_new, v_new, scale, vote_from=None) -> (out [T,Hq,D], mass [H,L] | None)``
* ``accumulate_scores(regions, layout, block_row, mass)``
* ``maintain_hi(regions, layout, config, block_row, ctx_len, k_new, v_new)``
* ``forward_request(regions, layout, config, block_row, ctx_len, q, k, v, scale) -> out [T,Hq,D]``
* helpers: ``store_balancer(regions, layout, block_row, b) -> stored b fp32``,
  ``load_balancer(regions, layout, block_row) -> b [H,D] | None``,
  ``first_voting_row(config, T) -> int``, ``token_slots(block_row, start, end, N) -> (blocks, offsets)``
"""

from __future__ import annotations

import torch

from ..config import MiKVConfig
from .balancer import compute_balancer, from_storage, to_storage
from .importance import select_hi
from .layout import RegionLayout
from .quant import dequantize, quantize

# Attention processes query rows in chunks so logits stay below this many elements.
MAX_LOGIT_ELEMENTS = 1 << 24


def _num_blocks(length: int, block_size: int) -> int:
    return -(-length // block_size)


def token_slots(block_row: torch.Tensor, start: int, end: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(physical block, offset) of positions ``[start, end)`` (int64, on block_row's device)."""
    pos = torch.arange(start, end, device=block_row.device)
    return block_row.long()[pos // block_size], pos % block_size


# ----------------------------------------------------------------- balancer
def store_balancer(regions: torch.Tensor, layout: RegionLayout, block_row: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Store b ``[H, D]`` (fp16, clamped) in ``block_row[0]``'s header; return the stored value as fp32."""
    views = layout.views(regions)
    views.balancer[int(block_row[0])] = to_storage(b).to(regions.device)
    return load_balancer(regions, layout, block_row)


def load_balancer(regions: torch.Tensor, layout: RegionLayout, block_row: torch.Tensor) -> torch.Tensor | None:
    """Stored balancer ``[H, D]`` fp32, or None when the layout has none."""
    if not layout.has_balancer:
        return None
    return from_storage(layout.views(regions).balancer[int(block_row[0])])


# -------------------------------------------------------------------- store
def write_tokens(regions: torch.Tensor, layout: RegionLayout, block_row: torch.Tensor, start: int,
                 k: torch.Tensor, v: torch.Tensor, balancer: torch.Tensor | None = None) -> None:
    """Store lo copies of ``k, v [T, H, D]`` at positions ``[start, start+T)``.

    K is multiplied by ``balancer [H, D]`` (if given) before quantization. Scores
    of the new tokens are set to 0; blocks whose offset 0 is written get all R
    tags cleared (reused blocks are not zeroed by vLLM).
    """
    t, start = k.shape[0], int(start)
    if t == 0:
        return
    views = layout.views(regions)
    blk, off = token_slots(block_row.to(regions.device), start, start + t, layout.block_size)
    if layout.hi_slots:
        views.tag[blk[off == 0]] = 0
        views.score[blk, :, off] = 0
    if layout.bits:
        kb = k.float() * balancer if balancer is not None else k.float()
        pk, sk = quantize(kb, layout.bits, layout.group)
        pv, sv = quantize(v.float(), layout.bits, layout.group)
        views.k_lo[blk, :, off] = pk
        views.k_sz[blk, :, off] = sk
        views.v_lo[blk, :, off] = pv
        views.v_sz[blk, :, off] = sv


# ------------------------------------------------------------------- gather
def gather_context(regions: torch.Tensor, layout: RegionLayout, block_row: torch.Tensor, ctx_len: int,
                   balancer: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K, V ``[H, L, D]`` fp32 and ``valid [H, L]`` for positions ``[0, ctx_len)``.

    Tagged tokens read their hi copy; the others the dequantized lo copy (K
    divided by ``balancer``). ``valid`` is False only for untagged tokens when
    lo_bits is 0 (evicted; their K/V are 0).
    """
    views = layout.views(regions)
    ctx_len = int(ctx_len)
    h, d, n = regions.shape[1], layout.head_dim, layout.block_size
    dev = regions.device
    row = block_row.to(dev).long()
    if layout.bits:
        # Whole blocks at once (cheaper than per-token indexing), then trim to ctx_len.
        blocks = row[:_num_blocks(ctx_len, n)]

        def lo(packed: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
            x = dequantize(packed[blocks], sz[blocks], layout.bits, layout.group, d)   # [nb, H, N, D]
            return x.transpose(0, 1).reshape(h, -1, d)[:, :ctx_len]

        k, v = lo(views.k_lo, views.k_sz), lo(views.v_lo, views.v_sz)
        if balancer is not None:
            k = k / balancer[:, None, :]
        k, v = k.contiguous(), v.contiguous()
        valid = torch.ones(h, ctx_len, dtype=torch.bool, device=dev)
    else:
        k = torch.zeros(h, ctx_len, d, device=dev)
        v = torch.zeros(h, ctx_len, d, device=dev)
        valid = torch.zeros(h, ctx_len, dtype=torch.bool, device=dev)
    if layout.hi_slots and ctx_len:
        blocks = row[:_num_blocks(ctx_len, n)]
        tags = views.tag[blocks].transpose(0, 1).reshape(h, -1)                      # [H, S]
        hh, slot = torch.nonzero((tags > 0) & (tags <= ctx_len), as_tuple=True)
        pos = tags[hh, slot].long() - 1
        r = layout.hi_slots
        k[hh, pos] = views.k_hi[blocks[slot // r], hh, slot % r].float()
        v[hh, pos] = views.v_hi[blocks[slot // r], hh, slot % r].float()
        valid[hh, pos] = True
    return k, v, valid


# ---------------------------------------------------------------- attention
def first_voting_row(config: MiKVConfig, num_rows: int) -> int:
    """Index of the first query row of a chunk whose probabilities count as score."""
    if config.scorer == "window" and num_rows > 1:
        return max(0, num_rows - config.obs_window)
    return 0


def attention(q: torch.Tensor, k_ctx: torch.Tensor, v_ctx: torch.Tensor, valid_ctx: torch.Tensor,
              k_new: torch.Tensor, v_new: torch.Tensor, scale: float,
              vote_from: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal GQA attention of the chunk's queries over context + chunk, fp32.

    q ``[T, Hq, D]`` at positions ``[ctx, ctx+T)``; ``k_ctx, v_ctx [H, ctx, D]``
    with ``valid_ctx [H, ctx]`` (invalid keys get weight exactly 0);
    ``k_new, v_new [T, H, D]`` raw. Query head i uses KV head ``i // (Hq // H)``.
    Returns ``out [T, Hq, D]`` and, when ``vote_from`` is not None, ``mass [H, ctx+T]``:
    softmax probabilities summed over the group's query heads and query rows
    ``>= vote_from``.
    """
    t, hq, d = q.shape
    h, ctx = k_ctx.shape[0], k_ctx.shape[1]
    g = hq // h
    dev = q.device
    keys = torch.cat([k_ctx.float(), k_new.float().transpose(0, 1)], dim=1)          # [H, S, D]
    vals = torch.cat([v_ctx.float(), v_new.float().transpose(0, 1)], dim=1)
    s = ctx + t
    qh = q.float().reshape(t, h, g, d).permute(1, 2, 0, 3)                          # [H, g, T, D]
    out = torch.empty(h, g, t, d, device=dev)
    mass = torch.zeros(h, s, device=dev) if vote_from is not None else None
    key_pos = torch.arange(s, device=dev)
    key_ok = torch.cat([valid_ctx.to(dev), torch.ones(h, t, dtype=torch.bool, device=dev)], dim=1)   # [H, S]
    rows = max(1, MAX_LOGIT_ELEMENTS // max(1, h * g * s))
    for i0 in range(0, t, rows):
        i1 = min(t, i0 + rows)
        logits = torch.einsum("hgtd,hsd->hgts", qh[:, :, i0:i1], keys) * scale
        causal = key_pos[None, :] <= (ctx + torch.arange(i0, i1, device=dev))[:, None]   # [rows, S]
        allowed = causal[None] & key_ok[:, None]                                        # [H, rows, S]
        p = torch.softmax(logits.masked_fill_(~allowed[:, None], -float("inf")), dim=-1)
        out[:, :, i0:i1] = torch.einsum("hgts,hsd->hgtd", p, vals)
        if mass is not None and i1 > vote_from:
            mass += p[:, :, max(0, vote_from - i0):].sum(dim=(1, 2))
    return out.permute(2, 0, 1, 3).reshape(t, hq, d), mass


# ------------------------------------------------------------------- scores
def accumulate_scores(regions: torch.Tensor, layout: RegionLayout, block_row: torch.Tensor,
                      mass: torch.Tensor) -> None:
    """Add ``mass [H, L]`` to the scores of positions ``[0, L)`` (saturating in the score dtype)."""
    if not layout.hi_slots:
        return
    views = layout.views(regions)
    h, length, n = mass.shape[0], mass.shape[1], layout.block_size
    blocks = block_row.to(regions.device).long()[:_num_blocks(length, n)]
    cur = views.score[blocks].transpose(0, 1).reshape(h, -1).float()                 # [H, nb*N]
    cur[:, :length] += mass.float()
    top = torch.finfo(layout.score_dtype).max
    views.score[blocks] = cur.clamp(max=top).to(layout.score_dtype).reshape(h, -1, n).transpose(0, 1)


# --------------------------------------------------------------- hi slots
def maintain_hi(regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, block_row: torch.Tensor,
                ctx_len: int, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
    """Re-select the hi set after writing ``k_new, v_new [T, H, D]`` at ``[ctx_len, L)``.

    Candidates: tokens tagged now + the new tokens. Losers among the tagged are
    demoted (tag cleared); selected new tokens get a free slot (lowest free slot
    index across the request's blocks, in position order) holding their raw K/V
    in the hi dtype.
    """
    r, t, ctx_len = layout.hi_slots, k_new.shape[0], int(ctx_len)
    if not r or t == 0:
        return
    views = layout.views(regions)
    dev, n = regions.device, layout.block_size
    seq_len = ctx_len + t
    blocks = block_row.to(dev).long()[:_num_blocks(seq_len, n)]
    h = regions.shape[1]
    tags = views.tag[blocks].transpose(0, 1).reshape(h, -1)                          # [H, S]
    num_slots = tags.shape[1]
    tagged = (tags > 0) & (tags <= ctx_len)
    old_pos = torch.where(tagged, tags.long() - 1, -1)
    new_pos = torch.arange(ctx_len, seq_len, device=dev).expand(h, t)
    positions = torch.cat([old_pos, new_pos], dim=1)                                 # [H, S+T]
    all_scores = views.score[blocks].transpose(0, 1).reshape(h, -1).float()         # [H, nb*N]
    scores = all_scores.gather(1, positions.clamp(min=0))
    keep = select_hi(positions, scores, seq_len, config, num_slots)
    new_tags = torch.where(keep[:, :num_slots], tags, torch.zeros_like(tags))
    chosen = keep[:, num_slots:]                                                     # [H, T]
    hh, jj = torch.nonzero(chosen, as_tuple=True)                                    # sorted by (h, j)
    if hh.numel():
        free_first = torch.argsort((new_tags != 0).int(), dim=1, stable=True)        # free slots, index order
        rank = torch.cumsum(chosen.int(), dim=1) - 1
        slot = free_first[hh, rank[hh, jj]]
        new_tags[hh, slot] = (ctx_len + jj + 1).to(new_tags.dtype)
        blk, rr = blocks[slot // r], slot % r
        views.k_hi[blk, hh, rr] = k_new[jj, hh].to(dev, layout.hi_dtype)
        views.v_hi[blk, hh, rr] = v_new[jj, hh].to(dev, layout.hi_dtype)
    views.tag[blocks] = new_tags.reshape(h, -1, r).transpose(0, 1)


# ----------------------------------------------------------------- composed
def forward_request(regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, block_row: torch.Tensor,
                    ctx_len: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One chunk of one request: q ``[T, Hq, D]``, k/v ``[T, H, D]`` -> output ``[T, Hq, D]`` fp32.

    Mutates ``regions`` (store, scores, hi slots, balancer header). Call with
    growing ``ctx_len`` for chunked prefill and decode (T = 1).
    """
    ctx_len = int(ctx_len)
    if layout.has_balancer:
        if ctx_len == 0:
            b = store_balancer(regions, layout, block_row, compute_balancer(q, k))
        else:
            b = load_balancer(regions, layout, block_row)
    else:
        b = None
    write_tokens(regions, layout, block_row, ctx_len, k, v, b)
    k_ctx, v_ctx, valid = gather_context(regions, layout, block_row, ctx_len, b)
    vote_from = first_voting_row(config, q.shape[0]) if layout.hi_slots else None
    out, mass = attention(q, k_ctx, v_ctx, valid, k, v, scale, vote_from)
    if mass is not None:
        accumulate_scores(regions, layout, block_row, mass)
        maintain_hi(regions, layout, config, block_row, ctx_len, k, v)
    return out
