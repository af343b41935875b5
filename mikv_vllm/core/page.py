"""Page primitives of the MiKV cache (pure torch, fp32), shared by the oracle and the op sets.

``regions`` is one layer's cache as flat bytes ``[num_blocks, H, region_bytes]`` (uint8, see
:func:`layout.as_regions`); ``block_row`` a request's 1-D block table row: token p lives in block
``block_row[p // N]`` at offset ``p % N``. These are the per-request steps of docs/design.md that
the oracle (:mod:`.reference`) and the chunk paths of the torch and Triton op sets run alike:
balancer (load / compute and store), store of the lo copies, lo dequantization, score
accumulation and hi-set maintenance, and the shared-prefix bounds (``own_from``, ``shared_hi``).
Attention itself is not here: the oracle's dense attention is in :mod:`.reference`, the op sets
have their own.
"""

from __future__ import annotations

import torch

from ..config import MiKVConfig
from .balancer import balance_keys, compute_balancer, from_storage, to_storage, unbalance_keys
from .importance import select_hi
from .layout import RegionLayout
from .quant import dequantize, pack_meta, quantize, to_hi, unpack_meta


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
    if layout.has_lo:
        kb = balance_keys(k, balancer) if balancer is not None else k.float()
        pk, sk = quantize(kb, layout.k_bits, layout.group, layout.scale_fp8)
        pv, sv = quantize(v.float(), layout.v_bits, layout.group, layout.scale_fp8)
        if layout.scale_fp8:
            sk, sv = pack_meta(sk), pack_meta(sv)
        views.k_lo[blk, :, off] = pk
        views.k_sz[blk, :, off] = sk
        views.v_lo[blk, :, off] = pv
        views.v_sz[blk, :, off] = sv

# ------------------------------------------------------------------- gather
def read_meta(layout: RegionLayout, sz: torch.Tensor) -> torch.Tensor:
    """fp16 (scale, zero) ``[..., G, 2]`` of a ``k_sz`` / ``v_sz`` view (unpacked for fp8-scale)."""
    return unpack_meta(sz) if layout.scale_fp8 else sz


def lo_context(regions: torch.Tensor, layout: RegionLayout, blocks: torch.Tensor, length: int,
               balancer: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lo copies of the first ``length`` positions held by ``blocks`` (1-D block ids, in order):
    K (divided by ``balancer [H, D]``), V ``[H, length, D]`` fp32 and ``valid [H, length]``.

    Whole blocks are dequantized at once (cheaper than per-token indexing), then trimmed. With
    lo_bits 0 every position is invalid with K = V = 0 (evicted unless a hi copy is laid over it).
    """
    h, d, dev = regions.shape[1], layout.head_dim, regions.device
    if not layout.has_lo:
        zeros = torch.zeros(h, length, d, device=dev)
        return zeros, zeros.clone(), torch.zeros(h, length, dtype=torch.bool, device=dev)
    views = layout.views(regions)

    def lo(packed: torch.Tensor, sz: torch.Tensor, bits: int) -> torch.Tensor:
        x = dequantize(packed[blocks], read_meta(layout, sz[blocks]), bits, layout.group, d)   # [nb, H, N, D]
        return x.transpose(0, 1).reshape(h, -1, d)[:, :length]

    k, v = lo(views.k_lo, views.k_sz, layout.k_bits), lo(views.v_lo, views.v_sz, layout.v_bits)
    if balancer is not None:
        k = unbalance_keys(k, balancer[:, None, :])
    return k.contiguous(), v.contiguous(), torch.ones(h, length, dtype=torch.bool, device=dev)

# ---------------------------------------------------------------- attention
def first_voting_row(config: MiKVConfig, num_rows: int) -> int:
    """Index of the first query row of a chunk whose probabilities count as score."""
    if config.scorer == "window" and num_rows > 1:
        return max(0, num_rows - config.obs_window)
    return 0

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

def check_own_from(layout: RegionLayout, ctx_len: int, own_from: int) -> int:
    """``own_from`` as int; the new tokens must lie in owned blocks (``own_from * N <= ctx_len``)."""
    own_from = int(own_from)
    if own_from < 0 or own_from * layout.block_size > int(ctx_len):
        raise ValueError(f"own_from {own_from} (block size {layout.block_size}) must be in "
                         f"[0, ctx_len // block_size] for ctx_len {ctx_len}: a request writes only owned blocks")
    return own_from
