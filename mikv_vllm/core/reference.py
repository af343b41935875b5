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
2. :func:`write_tokens` - lo copies of the new K*b and V; R tags of every
   block whose offset 0 is written reset.
3. :func:`gather_context` + :func:`attention` - cached tokens read their hi copy
   if tagged, else the dequantized lo copy (K / b); the chunk uses raw K/V.
4. :func:`accumulate_scores` - softmax mass of the voting rows
   (:func:`first_voting_row`) added to the score of every hi token (scores live in the hi slots).
5. :func:`maintain_hi` - hi-set selection (core.importance) among the hi tokens (their slot
   scores) and the new tokens (their mass of this step), demotion by tag clearing, promotion of
   selected new tokens into free slots of any block (the slot's score = the token's mass).

Steps 4-5 are skipped when the layout has no hi slots (rtn). All maths is fp32;
returned outputs are fp32 (callers cast).

Shared prefix blocks (prefix caching, docs/design.md "Shared blocks"): ``own_from`` is the index
of a request's first *owned* block; blocks ``block_row[:own_from]`` were filled by another request
(or by this one before a preemption) and are read-only. Their lo copies are read; of their hi
copies only those no later step can change (tags ``<= shared_hi_limit``: sinks, or every prefix
token when the config never demotes). Scores, tags and hi slots are read and written only in owned
blocks. ``own_from = 0`` (the default) is the request that owns its whole row.

Kernel contract (mikv_vllm.kernels must match these signatures/semantics):

* ``write_tokens(regions, layout, block_row, start, k, v, balancer=None)``
* ``gather_context(regions, layout, block_row, ctx_len, balancer=None, own_from=0, shared_hi=0)
  -> (k [H,L,D], v [H,L,D], valid [H,L])``
* ``attention(q, k_ctx, v_ctx, valid_ctx, k_new, v_new, scale, vote_from=None) -> (out [T,Hq,D], mass [H,L] | None)``
* ``accumulate_scores(regions, layout, block_row, ctx_len, mass, own_from=0)``
* ``maintain_hi(regions, layout, config, block_row, ctx_len, k_new, v_new, mass, own_from=0)``
* ``forward_request(regions, layout, config, block_row, ctx_len, q, k, v, scale, own_from=0) -> out [T,Hq,D]``
* ``forward_decode(regions, layout, config, block_tables, ctx_lens, q, k, v, scale, own_from=None) -> out [B,Hq,D]``
  (one decode token for each of B requests; the per-request step, batched)
* ``forward_chunks(regions, layout, config, block_tables, ctx_lens, rows, q, k, v, scale, own_from=None) -> out [Tq,Hq,D]``
  (the multi-token chunks of one step: chunk c is rows ``rows[c]`` of q/k/v of one request, at ``ctx_lens[c]``)
* helpers: ``store_balancer(regions, layout, block_row, b) -> stored b fp32``,
  ``load_balancer(regions, layout, block_row) -> b [H,D] | None``,
  ``first_voting_row(config, T) -> int``, ``token_slots(block_row, start, end, N) -> (blocks, offsets)``,
  ``shared_hi_limit(config, layout, own_from) -> int``
"""

from __future__ import annotations

import torch

from ..config import MiKVConfig
from .balancer import balance_keys, compute_balancer, from_storage, to_storage, unbalance_keys
from .importance import select_hi
from .layout import RegionLayout
from .quant import dequantize, finite_inputs, quantize, to_hi

# Attention processes query rows in chunks (at most QUERY_ROWS rows, so each chunk skips the keys
# its rows cannot see) with logits below MAX_LOGIT_ELEMENTS elements.
MAX_LOGIT_ELEMENTS = 1 << 24
QUERY_ROWS = 256


def _num_blocks(length: int, block_size: int) -> int:
    return -(-length // block_size)


def token_slots(block_row: torch.Tensor, start: int, end: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(physical block, offset) of positions ``[start, end)`` (int64, on block_row's device)."""
    pos = torch.arange(start, end, device=block_row.device)
    return block_row.long()[pos // block_size], pos % block_size


def never_demotes(config: MiKVConfig, layout: RegionLayout) -> bool:
    """Every token is hi for the request's life (r = 1: budget L, one slot per position)."""
    return layout.hi_slots >= layout.block_size and config.hi_ratio >= 1


def shared_hi_limit(config: MiKVConfig, layout: RegionLayout, own_from: int) -> int:
    """Largest tag (position + 1) a reader may use from the hi slots of its shared blocks
    ``[0, own_from)``: hi copies that no later step of the writer can change. Sinks are never
    demoted (importance.hi_budget); with :func:`never_demotes` no hi copy ever is."""
    shared = int(own_from) * layout.block_size
    if not layout.hi_slots or not shared:
        return 0
    return shared if never_demotes(config, layout) else min(config.sink_tokens, shared)


def shared_hi_limits(config: MiKVConfig, layout: RegionLayout, own_from: torch.Tensor) -> torch.Tensor:
    """:func:`shared_hi_limit` for a tensor of ``own_from`` values (int64, same shape, no host sync)."""
    shared = own_from.long() * layout.block_size
    if not layout.hi_slots:
        return torch.zeros_like(shared)
    return shared if never_demotes(config, layout) else shared.clamp(max=config.sink_tokens)


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


def request_balancer(regions: torch.Tensor, layout: RegionLayout, block_row: torch.Tensor, ctx_len: int,
                     q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """A request's balancer for a chunk at ``ctx_len``: computed and stored when ``ctx_len == 0``,
    loaded otherwise; None when the layout has none.

    It is computed from the chunk's tokens that fall in the first block (the first
    ``min(T, block_size)``), so the first block's bytes depend on that block's tokens only
    (a shareable prefix block, docs/design.md)."""
    if not layout.has_balancer:
        return None
    if int(ctx_len) == 0:
        n = layout.block_size
        return store_balancer(regions, layout, block_row, compute_balancer(q[:n], k[:n]))
    return load_balancer(regions, layout, block_row)


# -------------------------------------------------------------------- store
def write_tokens(regions: torch.Tensor, layout: RegionLayout, block_row: torch.Tensor, start: int,
                 k: torch.Tensor, v: torch.Tensor, balancer: torch.Tensor | None = None) -> None:
    """Store lo copies of ``k, v [T, H, D]`` at positions ``[start, start+T)``.

    K is multiplied by ``balancer [H, D]`` (if given) before quantization. Blocks whose offset 0
    is written get all R tags cleared (reused blocks are not zeroed by vLLM); scores belong to hi
    slots and are set when a slot is filled (:func:`maintain_hi`).
    """
    t, start = k.shape[0], int(start)
    if t == 0:
        return
    blk, off = token_slots(block_row.to(regions.device), start, start + t, layout.block_size)
    store_at(regions, layout, blk, off, k, v, balancer)


def store_at(regions: torch.Tensor, layout: RegionLayout, blk: torch.Tensor, off: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor, balancer: torch.Tensor | None = None) -> None:
    """:func:`write_tokens` for explicit slots: token i goes to block ``blk[i]``, offset ``off[i]``.

    ``k, v [T, H, D]``; ``balancer`` ``[H, D]`` or per token ``[T, H, D]``.
    """
    views = layout.views(regions)
    if layout.hi_slots:
        views.tag[blk[off == 0]] = 0
    if layout.bits:
        kb = balance_keys(k, balancer) if balancer is not None else k.float()
        pk, sk = quantize(kb, layout.bits, layout.group)
        pv, sv = quantize(v.float(), layout.bits, layout.group)
        views.k_lo[blk, :, off] = pk
        views.k_sz[blk, :, off] = sk
        views.v_lo[blk, :, off] = pv
        views.v_sz[blk, :, off] = sv


# ------------------------------------------------------------------- gather
def lo_context(regions: torch.Tensor, layout: RegionLayout, blocks: torch.Tensor, length: int,
               balancer: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lo copies of the first ``length`` positions held by ``blocks`` (1-D block ids, in order):
    K (divided by ``balancer [H, D]``), V ``[H, length, D]`` fp32 and ``valid [H, length]``.

    Whole blocks are dequantized at once (cheaper than per-token indexing), then trimmed. With
    lo_bits 0 every position is invalid with K = V = 0 (evicted unless a hi copy is laid over it).
    """
    h, d, dev = regions.shape[1], layout.head_dim, regions.device
    if not layout.bits:
        zeros = torch.zeros(h, length, d, device=dev)
        return zeros, zeros.clone(), torch.zeros(h, length, dtype=torch.bool, device=dev)
    views = layout.views(regions)

    def lo(packed: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
        x = dequantize(packed[blocks], sz[blocks], layout.bits, layout.group, d)   # [nb, H, N, D]
        return x.transpose(0, 1).reshape(h, -1, d)[:, :length]

    k, v = lo(views.k_lo, views.k_sz), lo(views.v_lo, views.v_sz)
    if balancer is not None:
        k = unbalance_keys(k, balancer[:, None, :])
    return k.contiguous(), v.contiguous(), torch.ones(h, length, dtype=torch.bool, device=dev)


def gather_context(regions: torch.Tensor, layout: RegionLayout, block_row: torch.Tensor, ctx_len: int,
                   balancer: torch.Tensor | None = None, own_from: int = 0,
                   shared_hi: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K, V ``[H, L, D]`` fp32 and ``valid [H, L]`` for positions ``[0, ctx_len)``.

    Tagged tokens read their hi copy; the others the dequantized lo copy (K
    divided by ``balancer``). ``valid`` is False only for untagged tokens when
    lo_bits is 0 (evicted; their K/V are 0). Slots of the shared blocks ``[0, own_from)``
    count only with tags ``<= shared_hi`` (:func:`shared_hi_limit`).
    """
    views = layout.views(regions)
    ctx_len = int(ctx_len)
    h, n = regions.shape[1], layout.block_size
    dev = regions.device
    row = block_row.to(dev).long()
    k, v, valid = lo_context(regions, layout, row[:_num_blocks(ctx_len, n)], ctx_len, balancer)
    if layout.hi_slots and ctx_len:
        blocks = row[:_num_blocks(ctx_len, n)]
        tags = views.tag[blocks].transpose(0, 1).reshape(h, -1)                      # [H, S]
        limit = torch.full((tags.shape[1],), ctx_len, device=dev)
        limit[: int(own_from) * layout.hi_slots] = min(int(shared_hi), ctx_len)    # shared blocks
        hh, slot = torch.nonzero((tags > 0) & (tags <= limit), as_tuple=True)
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
    qh = (q.float() * scale).reshape(t, h, g, d).permute(1, 2, 0, 3)                # [H, g, T, D]
    out = torch.empty(h, g, t, d, device=dev)
    mass = torch.zeros(h, s, device=dev) if vote_from is not None else None
    key_pos = torch.arange(s, device=dev)
    key_ok = torch.cat([valid_ctx.to(dev), torch.ones(h, t, dtype=torch.bool, device=dev)], dim=1)   # [H, S]
    rows = max(1, min(QUERY_ROWS, MAX_LOGIT_ELEMENTS // max(1, h * g * s)))
    for i0 in range(0, t, rows):
        i1 = min(t, i0 + rows)
        e = ctx + i1                                     # causal: rows < i1 see keys < ctx + i1 only
        logits = torch.einsum("hgtd,hsd->hgts", qh[:, :, i0:i1], keys[:, :e])
        causal = key_pos[None, :e] <= (ctx + torch.arange(i0, i1, device=dev))[:, None]   # [rows, e]
        allowed = causal[None] & key_ok[:, None, :e]                                    # [H, rows, e]
        p = torch.softmax(logits.masked_fill_(~allowed[:, None], -float("inf")), dim=-1)
        out[:, :, i0:i1] = torch.einsum("hgts,hsd->hgtd", p, vals[:, :e])
        if mass is not None and i1 > vote_from:
            mass[:, :e] += p[:, :, max(0, vote_from - i0):].sum(dim=(1, 2))
    return out.permute(2, 0, 1, 3).reshape(t, hq, d), mass


# ------------------------------------------------------------------- scores
def accumulate_scores(regions: torch.Tensor, layout: RegionLayout, block_row: torch.Tensor, ctx_len: int,
                      mass: torch.Tensor, own_from: int = 0) -> None:
    """Add ``mass [H, L]`` to the score of every hi slot of the owned blocks ``[own_from, ...)`` whose
    tag is a context position (``[0, ctx_len)``), saturating in the score dtype. The new tokens'
    mass goes to :func:`maintain_hi` instead: they hold no slot yet."""
    if not layout.hi_slots:
        return
    views = layout.views(regions)
    h, length, n = mass.shape[0], mass.shape[1], layout.block_size
    blocks = block_row.to(regions.device).long()[int(own_from):_num_blocks(length, n)]
    if blocks.numel() == 0:
        return
    tags = views.tag[blocks].transpose(0, 1).reshape(h, -1).long()                    # [H, S]
    live = (tags > 0) & (tags <= min(int(ctx_len), length))
    add = mass.float().gather(1, torch.where(live, tags - 1, 0))
    cur = views.score[blocks].transpose(0, 1).reshape(h, -1).float()                 # [H, S]
    top = torch.finfo(layout.score_dtype).max
    new = torch.where(live, (cur + add).clamp(max=top), cur)
    views.score[blocks] = new.to(layout.score_dtype).reshape(h, -1, layout.hi_slots).transpose(0, 1)


# --------------------------------------------------------------- hi slots
def maintain_hi(regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, block_row: torch.Tensor,
                ctx_len: int, k_new: torch.Tensor, v_new: torch.Tensor, mass: torch.Tensor,
                own_from: int = 0) -> None:
    """Re-select the hi set after writing ``k_new, v_new [T, H, D]`` at ``[ctx_len, L)``.

    Candidates: tokens tagged now (score: their slot's, after :func:`accumulate_scores`) + the new
    tokens (score: their column of this step's ``mass [H, L]``). Losers among the tagged are
    demoted (tag cleared; the slot's score is left as it is); selected new tokens get a free slot
    (lowest free slot index across the request's blocks, in position order) holding their raw K/V
    in the hi dtype and their mass as its score. Only the slots of the owned blocks
    ``[own_from, ...)`` count (the budget's ``num_slots`` too); shared blocks are not touched.
    """
    r, t, ctx_len = layout.hi_slots, k_new.shape[0], int(ctx_len)
    if not r or t == 0:
        return
    views = layout.views(regions)
    dev, n = regions.device, layout.block_size
    seq_len = ctx_len + t
    blocks = block_row.to(dev).long()[int(own_from):_num_blocks(seq_len, n)]
    h = regions.shape[1]
    tags = views.tag[blocks].transpose(0, 1).reshape(h, -1)                          # [H, S]
    num_slots = tags.shape[1]
    tagged = (tags > 0) & (tags <= ctx_len)
    old_pos = torch.where(tagged, tags.long() - 1, -1)
    new_pos = torch.arange(ctx_len, seq_len, device=dev).expand(h, t)
    positions = torch.cat([old_pos, new_pos], dim=1)                                 # [H, S+T]
    slot_scores = views.score[blocks].transpose(0, 1).reshape(h, -1)                 # [H, S]
    new_scores = mass[:, ctx_len:seq_len].to(dev).float().clamp(max=torch.finfo(layout.score_dtype).max)
    scores = torch.cat([torch.where(tagged, slot_scores.float(), 0.0), new_scores], dim=1)
    keep = select_hi(positions, scores, seq_len, config, num_slots)
    new_tags = torch.where(keep[:, :num_slots], tags, torch.zeros_like(tags))
    chosen = keep[:, num_slots:]                                                     # [H, T]
    hh, jj = torch.nonzero(chosen, as_tuple=True)                                    # sorted by (h, j)
    if hh.numel():
        free_first = torch.argsort((new_tags != 0).int(), dim=1, stable=True)        # free slots, index order
        rank = torch.cumsum(chosen.int(), dim=1) - 1
        slot = free_first[hh, rank[hh, jj]]
        new_tags[hh, slot] = (ctx_len + jj + 1).to(new_tags.dtype)
        slot_scores = slot_scores.clone()
        slot_scores[hh, slot] = new_scores[hh, jj].to(layout.score_dtype)
        views.score[blocks] = slot_scores.reshape(h, -1, r).transpose(0, 1)
        blk, rr = blocks[slot // r], slot % r
        views.k_hi[blk, hh, rr] = to_hi(k_new[jj, hh].to(dev), layout.hi_dtype)
        views.v_hi[blk, hh, rr] = to_hi(v_new[jj, hh].to(dev), layout.hi_dtype)
    views.tag[blocks] = new_tags.reshape(h, -1, r).transpose(0, 1)


# ----------------------------------------------------------------- composed
def forward_request(regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, block_row: torch.Tensor,
                    ctx_len: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    own_from: int = 0) -> torch.Tensor:
    """One chunk of one request: q ``[T, Hq, D]``, k/v ``[T, H, D]`` -> output ``[T, Hq, D]`` fp32.

    Mutates ``regions`` (store, scores, hi slots, balancer header) in the owned blocks
    ``block_row[own_from:]`` only. Call with growing ``ctx_len`` for chunked prefill and decode (T = 1).
    """
    ctx_len, own_from = int(ctx_len), check_own_from(layout, ctx_len, own_from)
    q, k, v = finite_inputs(q), finite_inputs(k), finite_inputs(v)
    b = request_balancer(regions, layout, block_row, ctx_len, q, k)
    write_tokens(regions, layout, block_row, ctx_len, k, v, b)
    k_ctx, v_ctx, valid = gather_context(regions, layout, block_row, ctx_len, b, own_from,
                                         shared_hi_limit(config, layout, own_from))
    vote_from = first_voting_row(config, q.shape[0]) if layout.hi_slots else None
    out, mass = attention(q, k_ctx, v_ctx, valid, k, v, scale, vote_from)
    if mass is not None:
        accumulate_scores(regions, layout, block_row, ctx_len, mass, own_from)
        maintain_hi(regions, layout, config, block_row, ctx_len, k, v, mass, own_from)
    return out


def check_own_from(layout: RegionLayout, ctx_len: int, own_from: int) -> int:
    """``own_from`` as int; the new tokens must lie in owned blocks (``own_from * N <= ctx_len``)."""
    own_from = int(own_from)
    if own_from < 0 or own_from * layout.block_size > int(ctx_len):
        raise ValueError(f"own_from {own_from} (block size {layout.block_size}) must be in "
                         f"[0, ctx_len // block_size] for ctx_len {ctx_len}: a request writes only owned blocks")
    return own_from


def forward_chunks(regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, block_tables: torch.Tensor,
                   ctx_lens: torch.Tensor, rows: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   scale: float, own_from=None) -> torch.Tensor:
    """Every multi-token chunk of a step: :func:`forward_request` per chunk (the oracle's loop).

    Chunk c belongs to its own request (block row ``block_tables[c]``, context ``ctx_lens[c]``) and
    covers query rows ``rows[c, 0]:rows[c, 1]`` of q ``[Tq, Hq, D]``, k/v ``[Tq, H, D]``. Returns
    ``[Tq, Hq, D]`` fp32; rows outside every chunk are 0. ``own_from`` (None or one int per chunk):
    each chunk's first owned block (shared prefix blocks before it are read-only).
    """
    owns = [0] * len(block_tables) if own_from is None else [int(o) for o in torch.as_tensor(own_from).tolist()]
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for c, (start, end) in enumerate(torch.as_tensor(rows).reshape(-1, 2).tolist()):
        if end > start:
            out[start:end] = forward_request(regions, layout, config, block_tables[c], int(ctx_lens[c]),
                                             q[start:end], k[start:end], v[start:end], scale, owns[c])
    return out


# ------------------------------------------------------------ batched decode
# One decode step (T = 1) of B requests at once: the per-request ops above, vectorised over
# requests. ``block_tables [B, M]`` holds each request's block row (columns past a request's
# last block are never read or written, whatever they hold); ``pos [B]`` is each request's
# context length = the position of its new token; ``own_from [B]`` (int64, default all 0) each
# request's first owned block column (columns before it are shared, read-only) and ``shared_hi [B]``
# its :func:`shared_hi_limit`.

def _blocks_for(block_tables: torch.Tensor, lengths: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block columns covering the longest of ``lengths`` -> (blocks ``[B, nb]``, own ``[B, nb]`` bool:
    the columns holding the request's positions; see :func:`_owned` for write access)."""
    nbs = (lengths + n - 1) // n
    nb = int(nbs.max()) if lengths.numel() else 0
    own = torch.arange(nb, device=block_tables.device)[None, :] < nbs[:, None]
    blocks = block_tables[:, :nb].long()
    return torch.where(own, blocks, blocks[:, :1]), own   # padding columns read the first block


def _owned(own: torch.Tensor, own_from: torch.Tensor | None) -> torch.Tensor:
    """``own [B, nb]`` restricted to the owned columns ``>= own_from[b]`` (shared ones are read-only)."""
    if own_from is None:
        return own
    return own & (torch.arange(own.shape[1], device=own.device)[None, :] >= own_from.to(own.device)[:, None])


def _per_head(x: torch.Tensor) -> torch.Tensor:
    """``[B, nb, H, n, ...]`` block-major -> ``[B, H, nb * n, ...]`` position-major."""
    b, nb, h, n = x.shape[:4]
    return x.transpose(1, 2).reshape(b, h, nb * n, *x.shape[4:])


def gather_decode(regions: torch.Tensor, layout: RegionLayout, block_tables: torch.Tensor, pos: torch.Tensor,
                  balancer: torch.Tensor | None = None, own_from: torch.Tensor | None = None,
                  shared_hi: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`gather_context` for B requests: K, V ``[B, H, Lmax, D]`` fp32, valid ``[B, H, Lmax]``.

    Request b reads positions ``[0, pos[b])``; the rest of its row is invalid with K = V = 0.
    ``balancer`` ``[B, H, D]``; hi slots of shared columns (``< own_from[b]``) count only with
    tags ``<= shared_hi[b]``.
    """
    views = layout.views(regions)
    bsz, h, d, n = pos.shape[0], regions.shape[1], layout.head_dim, layout.block_size
    blocks, own = _blocks_for(block_tables, pos, n)
    lmax = int(pos.max()) if bsz else 0
    in_ctx = (torch.arange(lmax, device=pos.device)[None, :] < pos[:, None])[:, None].expand(bsz, h, lmax)
    if layout.bits:
        def lo(packed: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
            return _per_head(dequantize(packed[blocks], sz[blocks], layout.bits, layout.group, d))[:, :, :lmax]

        k, v = lo(views.k_lo, views.k_sz), lo(views.v_lo, views.v_sz)
        if balancer is not None:
            k = unbalance_keys(k, balancer[:, :, None, :])
        # positions past a request's context may hold stale or foreign bytes (NaN included):
        # their logits are masked, but 0 * NaN would reach the output through V
        v = torch.where(in_ctx[..., None], v, 0.0)
        valid = in_ctx.clone()
    else:
        k = torch.zeros(bsz, h, lmax, d, device=regions.device)
        v = torch.zeros_like(k)
        valid = torch.zeros(bsz, h, lmax, dtype=torch.bool, device=regions.device)
    r = layout.hi_slots
    if r and lmax:
        tags = _per_head(views.tag[blocks])                                              # [B, H, nb*R]
        slot_own = own.repeat_interleave(r, dim=1)[:, None]                               # [B, 1, nb*R]
        limit = pos[:, None].expand(bsz, own.shape[1])
        if own_from is not None:   # shared columns: only the hi copies no writer can change
            shared = ~_owned(own, own_from)
            limit = torch.where(shared, torch.minimum(limit, shared_hi.to(pos.device)[:, None]), limit)
        limit = limit.repeat_interleave(r, dim=1)[:, None]                                # [B, 1, nb*R]
        bb, hh, ss = torch.nonzero(slot_own & (tags > 0) & (tags <= limit), as_tuple=True)
        p = tags[bb, hh, ss].long() - 1
        k[bb, hh, p] = views.k_hi[blocks[bb, ss // r], hh, ss % r].float()
        v[bb, hh, p] = views.v_hi[blocks[bb, ss // r], hh, ss % r].float()
        valid[bb, hh, p] = True
    return k, v, valid


def attention_decode(q: torch.Tensor, k_ctx: torch.Tensor, v_ctx: torch.Tensor, valid_ctx: torch.Tensor,
                     pos: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention` for one query per request: q ``[B, Hq, D]`` at positions ``pos``.

    ``k_ctx, v_ctx [B, H, Lmax, D]``, ``valid_ctx [B, H, Lmax]`` (see :func:`gather_decode`);
    ``k_new, v_new [B, H, D]`` raw. Returns out ``[B, Hq, D]`` and mass ``[B, H, Lmax + 1]``
    (position-indexed: request b's new token is at ``pos[b]``; 0 past it).

    The reductions run per request over exactly its ``pos[b] + 1`` keys, so a request's
    result does not depend on the other requests of the batch (batch invariance: padding
    would change the summation order of softmax and P @ V in the last bits).
    """
    bsz, hq, d = q.shape
    h, lmax = k_ctx.shape[1], k_ctx.shape[2]
    g = hq // h
    qh = (q.float() * scale).reshape(bsz, h, g, d)
    out = torch.empty(bsz, h, g, d, device=q.device)
    mass = torch.zeros(bsz, h, lmax + 1, device=q.device)
    kn, vn = k_new.float()[:, :, None], v_new.float()[:, :, None]                      # [B, H, 1, D]
    all_valid = bool(valid_ctx.all()) if valid_ctx.numel() else True
    for b, length in enumerate(pos.tolist()):
        keys = torch.cat([k_ctx[b, :, :length], kn[b]], dim=1)                          # [H, L+1, D]
        vals = torch.cat([v_ctx[b, :, :length], vn[b]], dim=1)
        logits = torch.einsum("hgd,hsd->hgs", qh[b], keys)
        if not all_valid:   # evicted tokens (lo_bits 0) get weight exactly 0
            ok = torch.cat([valid_ctx[b, :, :length], valid_ctx.new_ones(h, 1)], dim=1)
            logits.masked_fill_(~ok[:, None], -float("inf"))
        p = torch.softmax(logits, dim=-1)
        out[b] = torch.einsum("hgs,hsd->hgd", p, vals)
        mass[b, :, :length + 1] = p.sum(dim=1)
    return out.reshape(bsz, hq, d), mass


def accumulate_scores_decode(regions: torch.Tensor, layout: RegionLayout, block_tables: torch.Tensor,
                             pos: torch.Tensor, mass: torch.Tensor, own_from: torch.Tensor | None = None) -> None:
    """:func:`accumulate_scores` for B requests: add ``mass [B, H, S]`` (position-indexed) to the
    score of every hi slot of the owned columns whose tag is a context position (``< pos[b]``)."""
    r = layout.hi_slots
    if not r or pos.numel() == 0:
        return
    views = layout.views(regions)
    bsz, h, n = pos.shape[0], regions.shape[1], layout.block_size
    blocks, own = _blocks_for(block_tables, pos + 1, n)
    own = _owned(own, own_from)
    tags = _per_head(views.tag[blocks]).long()                                            # [B, H, nb*R]
    slot_own = own.repeat_interleave(r, dim=1)[:, None]
    live = slot_own & (tags > 0) & (tags <= pos.clamp(max=mass.shape[2])[:, None, None])
    add = mass.float().gather(2, torch.where(live, tags - 1, 0))
    cur = _per_head(views.score[blocks]).float()                                          # [B, H, nb*R]
    top = torch.finfo(layout.score_dtype).max
    new = torch.where(live, (cur + add).clamp(max=top), cur)
    new = new.to(layout.score_dtype).reshape(bsz, h, -1, r).transpose(1, 2)               # [B, nb, H, R]
    views.score[blocks[own]] = new[own]


def maintain_hi_decode(regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig,
                       block_tables: torch.Tensor, pos: torch.Tensor, k_new: torch.Tensor,
                       v_new: torch.Tensor, mass: torch.Tensor, own_from: torch.Tensor | None = None) -> None:
    """:func:`maintain_hi` for B requests that each just wrote one token (``k_new, v_new [B, H, D]``;
    its score: ``mass[b, :, pos[b]]`` of the position-indexed ``mass [B, H, S]``); only the slots of
    the owned columns count and are written."""
    r = layout.hi_slots
    if not r or pos.numel() == 0:
        return
    views = layout.views(regions)
    bsz, h, n = pos.shape[0], regions.shape[1], layout.block_size
    seq = pos + 1
    blocks, own = _blocks_for(block_tables, seq, n)
    own = _owned(own, own_from)
    tags = _per_head(views.tag[blocks])                                                   # [B, H, S]
    num_slots = tags.shape[2]
    slot_own = own.repeat_interleave(r, dim=1)[:, None].expand(bsz, h, num_slots)
    tagged = slot_own & (tags > 0) & (tags <= pos[:, None, None])
    old_pos = torch.where(tagged, tags.long() - 1, -1)
    positions = torch.cat([old_pos, pos[:, None, None].expand(bsz, h, 1)], dim=2)       # [B, H, S+1]
    slot_scores = _per_head(views.score[blocks])                                          # [B, H, S]
    top = torch.finfo(layout.score_dtype).max
    new_score = mass.to(regions.device).float().gather(2, pos[:, None, None].expand(bsz, h, 1)).clamp(max=top)
    scores = torch.cat([torch.where(tagged, slot_scores.float(), 0.0), new_score], dim=2)
    keep = select_hi(positions, scores, seq[:, None, None], config, (own.sum(1) * r)[:, None, None])
    new_tags = torch.where(keep[..., :num_slots], tags, torch.zeros_like(tags))
    bb, hh = torch.nonzero(keep[..., num_slots], as_tuple=True)
    if bb.numel():
        taken = (new_tags != 0) | ~slot_own
        slot = torch.argsort(taken.int(), dim=2, stable=True)[bb, hh, 0]                 # lowest free slot
        new_tags[bb, hh, slot] = (pos[bb] + 1).to(new_tags.dtype)
        blk, rr = blocks[bb, slot // r], slot % r
        views.score[blk, hh, rr] = new_score[bb, hh, 0].to(layout.score_dtype)
        views.k_hi[blk, hh, rr] = to_hi(k_new[bb, hh].to(regions.device), layout.hi_dtype)
        views.v_hi[blk, hh, rr] = to_hi(v_new[bb, hh].to(regions.device), layout.hi_dtype)
    views.tag[blocks[own]] = new_tags.reshape(bsz, h, -1, r).transpose(1, 2)[own]


def decode_balancer(regions: torch.Tensor, layout: RegionLayout, block_tables: torch.Tensor,
                    pos: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """Balancer ``[B, H, D]`` of each request: computed from its own token and stored for a request at
    position 0 (vLLM's first tokens, CUDA-graph capture batches), loaded otherwise. Vectorised, no
    host sync: every row computes a candidate, rows at position 0 keep and store it."""
    if not layout.has_balancer:
        return None
    store = layout.views(regions).balancer
    first = block_tables[:, 0].to(regions.device).long()
    fresh = (pos.to(regions.device) == 0)[:, None, None]
    new = to_storage(compute_balancer(q[:, None], k[:, None])).to(regions.device)   # [B, H, D] fp16
    stored = torch.where(fresh, new, store[first])
    store[first] = stored
    return from_storage(stored)


# Padded context tokens (requests x longest context) per vectorised decode call: larger batches
# are split into groups of similar length, so padding and temporaries stay bounded.
DECODE_TOKENS_PER_CALL = 1 << 15


def decode_groups(ctx_lens: list[int], limit: int | None = None) -> list[list[int]]:
    """Request indices grouped by ascending context, each group's ``len * (max ctx + 1) <= limit``
    (default :data:`DECODE_TOKENS_PER_CALL`; a single request always forms a group)."""
    limit = DECODE_TOKENS_PER_CALL if limit is None else limit
    groups: list[list[int]] = []
    for i in sorted(range(len(ctx_lens)), key=lambda j: ctx_lens[j]):
        if groups and (len(groups[-1]) + 1) * (ctx_lens[i] + 1) <= limit:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def forward_decode(regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, block_tables: torch.Tensor,
                   ctx_lens: list[int], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   scale: float, own_from=None) -> torch.Tensor:
    """One decode step for B requests: q ``[B, Hq, D]``, k/v ``[B, H, D]`` at positions ``ctx_lens``.

    Same page effects and outputs (up to fp32 rounding) as
    ``forward_request(..., block_tables[i], ctx_lens[i], q[i:i+1], k[i:i+1], v[i:i+1], scale, own_from[i])``
    for every i; requests own disjoint blocks (shared ones are only read). Batch invariant: a request's output and page
    bytes do not depend on the other requests. Returns ``[B, Hq, D]`` fp32.
    """
    ctx_lens = [int(c) for c in ctx_lens]
    owns = decode_own_from(layout, ctx_lens, own_from)
    groups = decode_groups(ctx_lens)
    if len(groups) <= 1:
        return _forward_decode(regions, layout, config, block_tables, ctx_lens, q, k, v, scale, owns)
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for g in groups:
        idx = torch.tensor(g, device=q.device)
        out[idx] = _forward_decode(regions, layout, config, block_tables[idx.to(block_tables.device)],
                                   [ctx_lens[i] for i in g], q[idx], k[idx], v[idx], scale,
                                   None if owns is None else [owns[i] for i in g])
    return out


def decode_own_from(layout: RegionLayout, ctx_lens: list[int], own_from) -> list[int] | None:
    """``own_from`` (None, or one int per request) checked against ``ctx_lens``; None when all 0."""
    if own_from is None:
        return None
    owns = [int(o) for o in (own_from.tolist() if isinstance(own_from, torch.Tensor) else own_from)]
    if len(owns) != len(ctx_lens):
        raise ValueError(f"own_from has {len(owns)} entries for {len(ctx_lens)} requests")
    for c, o in zip(ctx_lens, owns):
        check_own_from(layout, c, o)
    return owns if any(owns) else None


def _forward_decode(regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, block_tables: torch.Tensor,
                    ctx_lens: list[int], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    scale: float, owns: list[int] | None = None) -> torch.Tensor:
    dev = regions.device
    bt = block_tables.to(dev)
    pos = torch.as_tensor([int(c) for c in ctx_lens], device=dev, dtype=torch.int64)
    if pos.numel() == 0:
        return q.new_zeros(q.shape, dtype=torch.float32)
    q, k, v = finite_inputs(q), finite_inputs(k), finite_inputs(v)
    b = decode_balancer(regions, layout, bt, pos, q, k)
    blk = bt.long().gather(1, (pos // layout.block_size)[:, None])[:, 0]
    store_at(regions, layout, blk, pos % layout.block_size, k, v, b)
    own_from = shared_hi = None
    if owns is not None:
        own_from = torch.as_tensor(owns, device=dev, dtype=torch.int64)
        shared_hi = torch.as_tensor([shared_hi_limit(config, layout, o) for o in owns], device=dev, dtype=torch.int64)
    k_ctx, v_ctx, valid = gather_decode(regions, layout, bt, pos, b, own_from, shared_hi)
    out, mass = attention_decode(q, k_ctx, v_ctx, valid, pos, k, v, scale)
    if layout.hi_slots:
        accumulate_scores_decode(regions, layout, bt, pos, mass, own_from)
        maintain_hi_decode(regions, layout, config, bt, pos, k, v, mass, own_from)
    return out
