"""Batched decode step of the torch op set: the per-request page steps vectorised over B requests
that each decode one token (no vllm import, pure torch).

Same page effects and outputs (up to fp32 rounding of score sums) as the oracle
``core.reference.forward_request`` per request (``tests/core/test_decode_batch.py``); batch
invariant: a request's output and page bytes do not depend on the other requests.
"""

from __future__ import annotations

import torch

from ..config import MiKVConfig
from ..core.balancer import compute_balancer, from_storage, to_storage, unbalance_keys
from ..core.importance import select_hi
from ..core.layout import RegionLayout
from ..core.page import read_meta, store_at
from ..core.quant import dequantize, to_hi

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
    if layout.has_lo:
        def lo(packed: torch.Tensor, sz: torch.Tensor, bits: int) -> torch.Tensor:
            sz = read_meta(layout, sz[blocks])
            return _per_head(dequantize(packed[blocks], sz, bits, layout.group, d))[:, :, :lmax]

        k, v = lo(views.k_lo, views.k_sz, layout.k_bits), lo(views.v_lo, views.v_sz, layout.v_bits)
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


def decode_rows(regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, block_tables: torch.Tensor,
                pos: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                own_from: torch.Tensor | None = None, shared_hi: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step of B requests, all tensors: ``pos`` int64 ``[B]`` on the cache's device,
    ``block_tables [B, >= max(pos) // N + 1]``, ``own_from`` / ``shared_hi`` int64 ``[B]`` or None
    (nothing shared). Returns ``[B, Hq, D]`` fp32."""
    if pos.numel() == 0:
        return q.new_zeros(q.shape, dtype=torch.float32)
    dev = regions.device
    bt = block_tables.to(dev)
    b = decode_balancer(regions, layout, bt, pos, q, k)
    blk = bt.long().gather(1, (pos // layout.block_size)[:, None])[:, 0]
    store_at(regions, layout, blk, pos % layout.block_size, k, v, b)
    k_ctx, v_ctx, valid = gather_decode(regions, layout, bt, pos, b, own_from, shared_hi)
    out, mass = attention_decode(q, k_ctx, v_ctx, valid, pos, k, v, scale)
    if layout.hi_slots:
        accumulate_scores_decode(regions, layout, bt, pos, mass, own_from)
        maintain_hi_decode(regions, layout, config, bt, pos, k, v, mass, own_from)
    return out


def forward_decode(regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, block_tables: torch.Tensor,
                   ctx_lens, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   scale: float, own_from=None) -> torch.Tensor:
    """The batched step with ``reference.forward_decode``'s signature (``TorchOps.forward_decode``)."""
    from .torch_ops import TorchOps

    return TorchOps.forward_decode(regions, layout, config, block_tables, ctx_lens, q, k, v, scale, own_from)
