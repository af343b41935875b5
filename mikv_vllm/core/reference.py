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

The oracle only: no production code calls this module. The op sets (``mikv_vllm.ops``: batched
torch, the fused C++ op, Triton) implement the typed contract ``ops.contract.MiKVOps`` and
``tests/test_ops_contract.py`` checks each against :func:`forward_request` per request (outputs and
page bytes). The per-request page steps (balancer, store, scores, hi maintenance, the shared-prefix
bounds) live in :mod:`.page` and are re-exported here; this module adds the dense
:func:`gather_context` + :func:`attention`, the composed :func:`forward_request`, and the loops
:func:`forward_chunks` / :func:`forward_decode` (one :func:`forward_request` per chunk / request).
"""

from __future__ import annotations

import torch

from ..config import MiKVConfig
from .layout import RegionLayout
from .quant import finite_inputs
from .page import (_num_blocks, accumulate_scores, check_own_from, first_voting_row, lo_context, load_balancer,  # noqa: F401
                   maintain_hi, never_demotes, request_balancer, shared_hi_limit, shared_hi_limits, store_at,
                   store_balancer, token_slots, write_tokens)

# Attention processes query rows in chunks (at most QUERY_ROWS rows, so each chunk skips the keys
# its rows cannot see) with logits below MAX_LOGIT_ELEMENTS elements.
MAX_LOGIT_ELEMENTS = 1 << 24
QUERY_ROWS = 256


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


def forward_decode(regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, block_tables: torch.Tensor,
                   ctx_lens, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   own_from=None) -> torch.Tensor:
    """One decode token for each of B requests: :func:`forward_request` per request, in order (the
    oracle of every op set's batched decode). q ``[B, Hq, D]``, k/v ``[B, H, D]`` at positions
    ``ctx_lens``; ``own_from`` None or one int per request. Returns ``[B, Hq, D]`` fp32."""
    ctx = [int(c) for c in torch.as_tensor(ctx_lens).reshape(-1).tolist()]
    owns = [0] * len(ctx) if own_from is None else [int(o) for o in torch.as_tensor(own_from).reshape(-1).tolist()]
    if len(owns) != len(ctx):
        raise ValueError(f"own_from has {len(owns)} entries for {len(ctx)} requests")
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for i, c in enumerate(ctx):
        out[i:i + 1] = forward_request(regions, layout, config, block_tables[i], c, q[i:i + 1], k[i:i + 1],
                                       v[i:i + 1], scale, owns[i])
    return out
