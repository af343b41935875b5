"""Chunks (prefill) in the torch op set and the Triton op set: the cached context attended in key
chunks of whole blocks with an online softmax, query rows in blocks, within the workspace of
``kernels.workspace`` (pure torch; nothing is dequantized beyond one key chunk)."""

from __future__ import annotations

import torch

from ..core.layout import RegionLayout
from ..core.page import lo_context


def _hi_entries(regions: torch.Tensor, layout: RegionLayout, blocks: torch.Tensor, ctx_len: int,
                own_from: int = 0, shared_hi: int = 0) -> tuple[torch.Tensor, ...]:
    """Hi copies of positions ``[0, ctx_len)`` sorted by position: (head, position, block, slot).
    Slots of the shared blocks ``[0, own_from)`` count only with tags ``<= shared_hi``."""
    views, r, h = layout.views(regions), layout.hi_slots, regions.shape[1]
    tags = views.tag[blocks].transpose(0, 1).reshape(h, -1)                          # [H, S]
    limit = torch.full((tags.shape[1],), ctx_len, device=tags.device)
    limit[: int(own_from) * r] = min(int(shared_hi), ctx_len)                         # shared blocks
    hh, slot = torch.nonzero((tags > 0) & (tags <= limit), as_tuple=True)
    pos = tags[hh, slot].long() - 1
    order = torch.argsort(pos, stable=True)
    hh, pos, slot = hh[order], pos[order], slot[order]
    return hh, pos, blocks[slot // r], slot % r


def _context_chunk(regions: torch.Tensor, layout: RegionLayout, blocks: torch.Tensor, c0: int, c1: int,
                   balancer: torch.Tensor | None, hi: tuple[torch.Tensor, ...]):
    """``reference.gather_context`` restricted to positions ``[c0, c1)`` (``c0`` a multiple of the
    block size): K, V ``[H, C, D]`` fp32 and valid ``[H, C]``."""
    views, n = layout.views(regions), layout.block_size
    k, v, valid = lo_context(regions, layout, blocks[c0 // n: -(-c1 // n)], c1 - c0, balancer)
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
                      workspace: int | None = None, own_from: int = 0,
                      shared_hi: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``reference.gather_context`` + ``reference.attention`` for one request's chunk, in a bounded
    workspace: the cached context in key chunks of whole blocks, then the chunk's raw K/V (causal)
    in chunks of the same width, online softmax in fp32, query rows in blocks
    (:func:`workspace.plan_prefill`). With ``vote_from``,
    a second pass recomputes the probabilities of rows ``>= vote_from`` for the score mass
    ``[H, ctx + T]``. ``own_from`` / ``shared_hi``: the shared-prefix bounds of
    ``reference.gather_context``. Returns (out ``[T, Hq, D]`` fp32, mass or None)."""
    from ..kernels.workspace import Dims, plan_prefill, workspace_bytes   # pure torch (no triton)

    t, hq, d = q.shape
    h = k_new.shape[1]
    g, n, dev = hq // h, layout.block_size, regions.device
    ctx_len = int(ctx_len)
    budget = workspace_bytes() if workspace is None else int(workspace)
    rows, chunk = plan_prefill(Dims(hq, h, layout), t, ctx_len, budget)
    blocks = block_row.to(dev).long()[: -(-ctx_len // n)]
    hi = _hi_entries(regions, layout, blocks, ctx_len, own_from, shared_hi) if layout.hi_slots and ctx_len else ((torch.empty(0),) * 4)
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
