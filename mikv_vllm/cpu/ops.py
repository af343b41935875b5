"""MiKV page ops on CPU with the fused C++ decode step (drop-in for ``core.reference``).

* decode (one token per request, any context incl. 0): :func:`decode_step` = the C++ op
  (balancer, store, attention over the packed page, score accumulation, per (request, KV head)
  in parallel), then ``reference.maintain_hi_decode`` (hi-set selection, batched torch).
* multi-token chunks: :func:`prefill_step` = the C++ op, every chunk of a step in one call
  (balancer, store, attention over the packed page, score mass, hi-set upkeep, per (chunk, KV head)
  in parallel); :func:`forward_chunks` is the op-set entry point.
"""

from __future__ import annotations

import torch

from ..config import MiKVConfig
from ..core import reference as ref
from ..core.layout import RegionLayout
from .build import load

_HI = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
_SCORE = {torch.float32: 0, torch.float16: 1}


def layout_meta(layout: RegionLayout) -> list[int]:
    """The layout as the flat int list the C++ op takes (order of ``Layout`` in mikv_common.h)."""
    return [layout.block_size, layout.head_dim, layout.bits, layout.group, layout.hi_slots, layout.region_bytes,
            layout.k_lo, layout.v_lo, layout.k_sz, layout.v_sz, layout.score, layout.tag, layout.k_hi,
            layout.v_hi, layout.balancer, _HI[layout.hi_dtype], _SCORE[layout.score_dtype],
            int(layout.has_balancer)]


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).contiguous()


def decode_step(regions: torch.Tensor, layout: RegionLayout, block_tables: torch.Tensor, pos: torch.Tensor,
                q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Balancer + store + attention + score accumulation for B requests (C++ op).

    ``block_tables`` int32 ``[B, M]`` (contiguous), ``pos`` int64 ``[B]`` (each request's context
    length = its new token's position); q ``[B, Hq, D]``, k/v ``[B, H, D]``. Page effects and output
    equal ``reference.decode_balancer`` + ``store_at`` + ``gather_decode`` + ``attention_decode`` +
    ``accumulate_scores_decode`` (to fp32 rounding). Returns ``[B, Hq, D]`` fp32.
    """
    return load().decode_step(regions, layout_meta(layout), block_tables, pos, _f32(q), _f32(k), _f32(v),
                              float(scale), True)


def forward_decode(regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, block_tables: torch.Tensor,
                   ctx_lens, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Same signature and page effects as ``reference.forward_decode`` (contexts may be 0)."""
    pos = torch.as_tensor(ctx_lens, dtype=torch.int64).reshape(-1).contiguous()
    bt = block_tables.to(torch.int32).contiguous()
    out = decode_step(regions, layout, bt, pos, q, k, v, scale)
    if layout.hi_slots:
        ref.maintain_hi_decode(regions, layout, config, bt, pos, k, v)
    return out


def prefill_step(regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, block_tables: torch.Tensor,
                 ctx_lens: torch.Tensor, rows: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """All multi-token chunks of a step in one C++ call (see ``reference.forward_chunks``).

    ``block_tables`` int32 ``[C, M]``, ``ctx_lens`` int64 ``[C]``, ``rows`` int64 ``[C, 2]`` (each
    chunk's query rows ``[start, end)`` of q ``[Tq, Hq, D]``, k/v ``[Tq, H, D]``; chunks of distinct
    requests). Returns ``[Tq, Hq, D]`` fp32, 0 outside the chunks.
    """
    window = config.obs_window if config.scorer == "window" else -1
    recent = -1 if config.recent_window is None else int(config.recent_window)
    return load().prefill_step(regions, layout_meta(layout), block_tables, ctx_lens, rows, _f32(q), _f32(k), _f32(v),
                               float(scale), float(config.hi_ratio), int(config.sink_tokens), recent, int(window))


def forward_chunks(regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, block_tables: torch.Tensor,
                   ctx_lens, rows, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Same signature and page effects as ``reference.forward_chunks`` (C++ :func:`prefill_step`)."""
    bt = block_tables.to(torch.int32).contiguous()
    ctx = torch.as_tensor(ctx_lens, dtype=torch.int64).reshape(-1).contiguous()
    rr = torch.as_tensor(rows, dtype=torch.int64).reshape(-1, 2).contiguous()
    return prefill_step(regions, layout, config, bt, ctx, rr, q, k, v, scale)


def forward_request(regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, block_row: torch.Tensor,
                    ctx_len: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Same signature and page effects as ``reference.forward_request`` (the fused C++ steps)."""
    if q.shape[0] == 1:
        return forward_decode(regions, layout, config, block_row.reshape(1, -1), [int(ctx_len)], q, k, v, scale)
    rows = torch.tensor([[0, q.shape[0]]], dtype=torch.int64)
    return forward_chunks(regions, layout, config, block_row.reshape(1, -1), [int(ctx_len)], rows, q, k, v, scale)


class CpuOps:
    """The reference op set with the fused C++ decode and prefill steps swapped in (same signatures)."""

    write_tokens = staticmethod(ref.write_tokens)
    gather_context = staticmethod(ref.gather_context)
    attention = staticmethod(ref.attention)
    accumulate_scores = staticmethod(ref.accumulate_scores)
    maintain_hi = staticmethod(ref.maintain_hi)
    store_balancer = staticmethod(ref.store_balancer)
    load_balancer = staticmethod(ref.load_balancer)
    forward_request = staticmethod(forward_request)
    forward_decode = staticmethod(forward_decode)
    forward_chunks = staticmethod(forward_chunks)
    decode_step = staticmethod(decode_step)
    prefill_step = staticmethod(prefill_step)
