"""Composed MiKV page ops on the Triton kernels (drop-in for ``core.reference``).

* decode (one token per request): Triton store + :func:`decode.decode_attention`
  with scores accumulated in-kernel; hi maintenance stays in torch
  (``reference.maintain_hi_decode``: selection logic, batched over requests).
* prefill / multi-token chunks: Triton store, then the dense reference path
  (``gather_context`` + torch ``attention`` over dequantized blocks).
* layouts outside :func:`_common.supported` fall back to the reference entirely.
"""

from __future__ import annotations

import torch

from ..config import MiKVConfig
from ..core import reference as ref
from ..core.layout import RegionLayout
from ._common import supported
from .decode import decode_attention
from .store import store_tokens, write_tokens


def forward_request(regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, block_row: torch.Tensor,
                    ctx_len: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Same signature and page effects as ``reference.forward_request``; output ``[T, Hq, D]`` fp32."""
    if not supported(layout):
        return ref.forward_request(regions, layout, config, block_row, ctx_len, q, k, v, scale)
    if q.shape[0] != 1:
        b = ref.request_balancer(regions, layout, block_row, ctx_len, q, k)
        write_tokens(regions, layout, block_row, ctx_len, k, v, b)
        k_ctx, v_ctx, valid = ref.gather_context(regions, layout, block_row, ctx_len, b)
        vote_from = ref.first_voting_row(config, q.shape[0]) if layout.hi_slots else None
        out, mass = ref.attention(q, k_ctx, v_ctx, valid, k, v, scale, vote_from)
        if mass is not None:
            ref.accumulate_scores(regions, layout, block_row, mass)
            ref.maintain_hi(regions, layout, config, block_row, ctx_len, k, v)
        return out
    return forward_decode(regions, layout, config, block_row[None], [ctx_len], q, k, v, scale)


def forward_decode(regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, block_tables: torch.Tensor,
                   ctx_lens: list[int], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """One decode step for B requests: q ``[B, Hq, D]``, k/v ``[B, H, D]`` at positions ``ctx_lens``.

    Equivalent to ``reference.forward_request(..., ctx_lens[i], q[i:i+1], ...)`` for every i
    (requests own disjoint blocks). Returns ``[B, Hq, D]`` fp32.
    """
    if not supported(layout):
        return ref.forward_decode(regions, layout, config, block_tables, ctx_lens, q, k, v, scale)
    ctx_lens = [int(c) for c in ctx_lens]
    dev, n = regions.device, layout.block_size
    bt = block_tables.to(dev)
    pos = torch.tensor(ctx_lens, device=dev, dtype=torch.int64)
    bal = ref.decode_balancer(regions, layout, bt, pos, q, k)
    blk = bt.long().gather(1, (pos // n)[:, None])[:, 0]
    store_tokens(regions, layout, blk, pos % n, k, v, bal)
    out, _ = decode_attention(regions, layout, bt, pos, q, k, v, scale, bal, max_ctx=max(ctx_lens, default=0),
                              need_mass=False, accumulate=True)
    ref.maintain_hi_decode(regions, layout, config, bt, pos, k, v)   # selection logic, batched torch
    return out


class TritonOps:
    """The reference op set with the Triton kernels swapped in (same signatures/semantics)."""

    write_tokens = staticmethod(write_tokens)
    gather_context = staticmethod(ref.gather_context)          # dense prefill path (torch)
    attention = staticmethod(ref.attention)                    # dense prefill path (torch)
    accumulate_scores = staticmethod(ref.accumulate_scores)    # decode fuses it into the kernel
    maintain_hi = staticmethod(ref.maintain_hi)                # selection logic (torch)
    store_balancer = staticmethod(ref.store_balancer)
    load_balancer = staticmethod(ref.load_balancer)
    forward_request = staticmethod(forward_request)
    # batched additions
    store_tokens = staticmethod(store_tokens)
    decode_attention = staticmethod(decode_attention)
    forward_decode = staticmethod(forward_decode)
