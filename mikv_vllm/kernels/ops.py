"""Composed MiKV page ops on the Triton kernels (drop-in for ``core.reference``), in a bounded
workspace (:mod:`.workspace`).

* decode (one token per request): requests grouped by context length so each group's buffers
  fit the workspace; per group Triton store + :func:`decode.decode_attention` with the hi slots'
  scores accumulated in-kernel (the new token's mass to a ``[B, H]`` buffer), then the
  incremental hi-set upkeep kernel (:func:`upkeep.maintain_hi_decode`, one program per
  (request, KV head)) reading that buffer.
* prefill / multi-token chunks: Triton store, then :func:`chunked_attention` (torch): the context
  attended in key chunks of whole blocks with an online softmax, query rows in blocks, a second
  pass for the score mass; nothing is dequantized beyond one key chunk.
* layouts outside :func:`_common.supported` fall back to the reference entirely.
* shared prefix blocks (``own_from > 0``, prefix caching) are not implemented in the Triton path:
  such rows raise NotImplementedError (the engine keeps prefix caching off on CUDA,
  vllm_glue/engine_config.py).
"""

from __future__ import annotations

import torch

from ..config import MiKVConfig
from ..core import reference as ref
from ..core.layout import RegionLayout
from ..core.quant import finite_inputs
from ._common import supported
from .decode import decode_attention, default_block_n, plan_splits
from .store import store_tokens, write_tokens
from .upkeep import maintain_hi_decode
from .workspace import Dims, plan_decode_groups, plan_prefill, workspace_bytes


SHARED_UNSUPPORTED = ("MiKV Triton ops: rows reading shared prefix blocks (own_from > 0) are not implemented; "
                      "serve with --no-enable-prefix-caching on CUDA (docs/usage.md)")


def forward_request(regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, block_row: torch.Tensor,
                    ctx_len: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    own_from: int = 0) -> torch.Tensor:
    """Same signature and page effects as ``reference.forward_request``; output ``[T, Hq, D]`` fp32."""
    if int(own_from):
        raise NotImplementedError(SHARED_UNSUPPORTED)
    if not supported(layout):
        return ref.forward_request(regions, layout, config, block_row, ctx_len, q, k, v, scale)
    ctx_len = int(ctx_len)
    q, k, v = finite_inputs(q), finite_inputs(k), finite_inputs(v)    # non-finite inputs: as the reference
    if q.shape[0] != 1:
        b = ref.request_balancer(regions, layout, block_row, ctx_len, q, k)
        write_tokens(regions, layout, block_row, ctx_len, k, v, b)
        vote_from = ref.first_voting_row(config, q.shape[0]) if layout.hi_slots else None
        out, mass = chunked_attention(regions, layout, block_row, ctx_len, q, k, v, scale, b, vote_from)
        if mass is not None:
            ref.accumulate_scores(regions, layout, block_row, ctx_len, mass)
            ref.maintain_hi(regions, layout, config, block_row, ctx_len, k, v, mass)
        return out
    return forward_decode(regions, layout, config, block_row[None], [ctx_len], q, k, v, scale)


def forward_decode(regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, block_tables: torch.Tensor,
                   ctx_lens: list[int], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   scale: float, own_from=None, *, workspace: int | None = None) -> torch.Tensor:
    """One decode step for B requests: q ``[B, Hq, D]``, k/v ``[B, H, D]`` at positions ``ctx_lens``.

    Equivalent to ``reference.forward_request(..., ctx_lens[i], q[i:i+1], ...)`` for every i
    (requests own disjoint blocks). Temporaries stay within ``workspace`` bytes (default
    :func:`workspace.workspace_bytes`). Returns ``[B, Hq, D]`` fp32.
    """
    if own_from is not None and any(int(o) for o in own_from):
        raise NotImplementedError(SHARED_UNSUPPORTED)
    if not supported(layout):
        return ref.forward_decode(regions, layout, config, block_tables, ctx_lens, q, k, v, scale)
    ctx_lens = [int(c) for c in ctx_lens]
    q, k, v = finite_inputs(q), finite_inputs(k), finite_inputs(v)
    dev = regions.device
    dims = Dims(q.shape[1], k.shape[1], layout)

    def splits_for(n_req: int, max_ctx: int) -> int:
        return plan_splits(n_req, dims.h, max_ctx, default_block_n(dev, layout.head_dim, max_ctx), dev)[1]

    budget = workspace_bytes() if workspace is None else int(workspace)
    groups = plan_decode_groups(dims, ctx_lens, budget, splits_for)
    if len(groups) == 1:
        return _decode_group(regions, layout, config, block_tables, ctx_lens, q, k, v, scale)
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    n = layout.block_size
    for g in groups:
        idx = torch.tensor(g, device=q.device)
        cols = max(ctx_lens[i] for i in g) // n + 1          # the group's blocks only (no padding copy)
        out[idx] = _decode_group(regions, layout, config, block_tables[:, :cols][idx.to(block_tables.device)],
                                 [ctx_lens[i] for i in g], q[idx], k[idx], v[idx], scale)
    return out


def _decode_group(regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, block_tables: torch.Tensor,
                  ctx_lens: list[int], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  scale: float) -> torch.Tensor:
    dev, n = regions.device, layout.block_size
    max_ctx = max(ctx_lens, default=0)
    bt = block_tables[:, : max_ctx // n + 1].to(dev)     # blocks of positions [0, ctx] of the longest
    pos = torch.tensor(ctx_lens, device=dev, dtype=torch.int64)
    bal = ref.decode_balancer(regions, layout, bt, pos, q, k)
    blk = bt.long().gather(1, (pos // n)[:, None])[:, 0]
    store_tokens(regions, layout, blk, pos % n, k, v, bal)
    # the new token's mass of this step ([B, H] fp32, within the group's workspace estimate): its
    # score as a candidate of the upkeep, and its slot's score if it is promoted
    new_mass = torch.empty(pos.shape[0], k.shape[1], device=dev, dtype=torch.float32) if layout.hi_slots else None
    out, _ = decode_attention(regions, layout, bt, pos, q, k, v, scale, bal, max_ctx=max_ctx,
                              need_mass=False, accumulate=True, new_mass=new_mass)
    if new_mass is not None:
        maintain_hi_decode(regions, layout, config, bt, pos, k, v, new_mass)
    return out


# ------------------------------------------------------------------ prefill
def _hi_entries(regions: torch.Tensor, layout: RegionLayout, blocks: torch.Tensor,
                ctx_len: int) -> tuple[torch.Tensor, ...]:
    """Hi copies of positions ``[0, ctx_len)`` sorted by position: (head, position, block, slot)."""
    views, r, h = layout.views(regions), layout.hi_slots, regions.shape[1]
    tags = views.tag[blocks].transpose(0, 1).reshape(h, -1)                          # [H, S]
    hh, slot = torch.nonzero((tags > 0) & (tags <= ctx_len), as_tuple=True)
    pos = tags[hh, slot].long() - 1
    order = torch.argsort(pos, stable=True)
    hh, pos, slot = hh[order], pos[order], slot[order]
    return hh, pos, blocks[slot // r], slot % r


def _context_chunk(regions: torch.Tensor, layout: RegionLayout, blocks: torch.Tensor, c0: int, c1: int,
                   balancer: torch.Tensor | None, hi: tuple[torch.Tensor, ...]):
    """``reference.gather_context`` restricted to positions ``[c0, c1)`` (``c0`` a multiple of the
    block size): K, V ``[H, C, D]`` fp32 and valid ``[H, C]``."""
    views, n = layout.views(regions), layout.block_size
    k, v, valid = ref.lo_context(regions, layout, blocks[c0 // n: -(-c1 // n)], c1 - c0, balancer)
    hh, pos, blk, rr = hi
    if hh.numel():
        lo_i, hi_i = (int(x) for x in torch.searchsorted(pos, torch.tensor([c0, c1], device=pos.device)))
        if hi_i > lo_i:
            sl = slice(lo_i, hi_i)
            p = pos[sl] - c0
            k[hh[sl], p] = views.k_hi[blk[sl], hh[sl], rr[sl]].float()
            v[hh[sl], p] = views.v_hi[blk[sl], hh[sl], rr[sl]].float()
            valid[hh[sl], p] = True
    return k, v, valid


def chunked_attention(regions: torch.Tensor, layout: RegionLayout, block_row: torch.Tensor, ctx_len: int,
                      q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, scale: float,
                      balancer: torch.Tensor | None = None, vote_from: int | None = None,
                      workspace: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``reference.gather_context`` + ``reference.attention`` for one request's chunk, in a bounded
    workspace: the cached context in key chunks of whole blocks, then the chunk's raw K/V (causal)
    in chunks of the same width, online softmax in fp32, query rows in blocks
    (:func:`workspace.plan_prefill`). With ``vote_from``,
    a second pass recomputes the probabilities of rows ``>= vote_from`` for the score mass
    ``[H, ctx + T]``. Returns (out ``[T, Hq, D]`` fp32, mass or None)."""
    t, hq, d = q.shape
    h = k_new.shape[1]
    g, n, dev = hq // h, layout.block_size, regions.device
    ctx_len = int(ctx_len)
    budget = workspace_bytes() if workspace is None else int(workspace)
    rows, chunk = plan_prefill(Dims(hq, h, layout), t, ctx_len, budget)
    blocks = block_row.to(dev).long()[: -(-ctx_len // n)]
    hi = _hi_entries(regions, layout, blocks, ctx_len) if layout.hi_slots and ctx_len else ((torch.empty(0),) * 4)
    out = torch.empty(t, hq, d, device=dev)
    m_all = torch.empty(h, g, t, device=dev)
    l_all = torch.empty(h, g, t, device=dev)

    def queries(i0, i1):
        return (q[i0:i1].to(dev).float() * scale).reshape(i1 - i0, h, g, d).permute(1, 2, 0, 3)   # [H, g, rows, D]

    def key_chunks(i1):
        """(first position, keys, values, mask(i0, i1)) per chunk: the cached context by
        ``chunk``, then the chunk's own raw K/V up to row ``i1`` (causal)."""
        for c0 in range(0, ctx_len, chunk):
            kc, vc, ok = _context_chunk(regions, layout, blocks, c0, min(ctx_len, c0 + chunk), balancer, hi)
            yield c0, kc, vc, (lambda i0, i1, ok=ok: ok[:, None, None, :])
        for j0 in range(0, i1, chunk):
            j1 = min(i1, j0 + chunk)
            kc = k_new[j0:j1].to(dev).float().transpose(0, 1)                          # [H, C, D]
            vc = v_new[j0:j1].to(dev).float().transpose(0, 1)

            def causal(i0, i1, j0=j0, j1=j1):
                return (torch.arange(j0, j1, device=dev)[None, :]
                        <= torch.arange(i0, i1, device=dev)[:, None])[None, None]
            yield ctx_len + j0, kc, vc, causal

    for i0 in range(0, t, rows):
        i1 = min(t, i0 + rows)
        qb = queries(i0, i1)
        m = torch.full((h, g, i1 - i0), -float("inf"), device=dev)
        ssum = torch.zeros(h, g, i1 - i0, device=dev)
        acc = torch.zeros(h, g, i1 - i0, d, device=dev)
        for _, kc, vc, mask in key_chunks(i1):
            logits = torch.einsum("hgtd,hsd->hgts", qb, kc).masked_fill_(~mask(i0, i1), -float("inf"))
            m_new = torch.maximum(m, logits.amax(dim=-1))
            m_safe = torch.where(m_new == -float("inf"), 0.0, m_new)
            p = torch.exp(logits - m_safe[..., None])
            alpha = torch.exp(m - m_safe)
            ssum = ssum * alpha + p.sum(dim=-1)
            acc = acc * alpha[..., None] + torch.einsum("hgts,hsd->hgtd", p, vc)
            m = m_new
            del logits, p
        out[i0:i1] = (acc / ssum[..., None]).permute(2, 0, 1, 3).reshape(i1 - i0, hq, d)
        m_all[:, :, i0:i1], l_all[:, :, i0:i1] = m, ssum
        del acc, qb
    if vote_from is None:
        return out, None
    mass = torch.zeros(h, ctx_len + t, device=dev)
    for i0 in range(max(0, vote_from), t, rows):
        i1 = min(t, i0 + rows)
        qb, m, inv = queries(i0, i1), m_all[:, :, i0:i1, None], 1.0 / l_all[:, :, i0:i1, None]
        for c0, kc, _, mask in key_chunks(i1):
            logits = torch.einsum("hgtd,hsd->hgts", qb, kc).masked_fill_(~mask(i0, i1), -float("inf"))
            mass[:, c0: c0 + kc.shape[1]] += (torch.exp(logits - m) * inv).sum(dim=(1, 2))
            del logits
    return out, mass


def forward_chunks(regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, block_tables: torch.Tensor,
                   ctx_lens: torch.Tensor, rows: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   scale: float, own_from=None) -> torch.Tensor:
    """``reference.forward_chunks`` with :func:`forward_request` per chunk (Triton chunked prefill)."""
    if own_from is not None and any(int(o) for o in torch.as_tensor(own_from).tolist()):
        raise NotImplementedError(SHARED_UNSUPPORTED)
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for c, (start, end) in enumerate(torch.as_tensor(rows).reshape(-1, 2).tolist()):
        if end > start:
            out[start:end] = forward_request(regions, layout, config, block_tables[c], int(ctx_lens[c]),
                                             q[start:end], k[start:end], v[start:end], scale)
    return out


class TritonOps:
    """The reference op set with the Triton kernels swapped in (same signatures/semantics)."""

    write_tokens = staticmethod(write_tokens)
    gather_context = staticmethod(ref.gather_context)          # unbounded dense gather (tests, tools)
    attention = staticmethod(ref.attention)                    # unbounded dense attention (tests, tools)
    accumulate_scores = staticmethod(ref.accumulate_scores)    # decode fuses it into the kernel
    maintain_hi = staticmethod(ref.maintain_hi)                # selection logic (torch)
    store_balancer = staticmethod(ref.store_balancer)
    load_balancer = staticmethod(ref.load_balancer)
    forward_request = staticmethod(forward_request)
    forward_chunks = staticmethod(forward_chunks)
    # batched additions
    store_tokens = staticmethod(store_tokens)
    decode_attention = staticmethod(decode_attention)
    forward_decode = staticmethod(forward_decode)
    chunked_attention = staticmethod(chunked_attention)
