"""MiKV page ops on CPU with the fused C++ decode step (drop-in for ``core.reference``).

* decode (one token per request, any context incl. 0): :func:`decode_step` = the C++ op
  (balancer, store, attention over the packed page, score accumulation and the incremental hi-set
  upkeep, per (request, KV head) in parallel; the upkeep equals ``reference.maintain_hi_decode``
  byte for byte).
* multi-token chunks: :func:`prefill_step` = the C++ op, every chunk of a step in one call
  (balancer, store, attention over the packed page, score mass, hi-set upkeep, per (chunk, KV head)
  in parallel); :func:`forward_chunks` is the op-set entry point.
* shared prefix blocks (prefix caching): ``own_from`` per row, read-only columns before it.
"""

from __future__ import annotations

import torch

from ..config import MiKVConfig
from ..core import reference as ref
from ..core.layout import RegionLayout
from ..core.quant import finite_inputs
from .build import load

_HI = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float8_e4m3fn: 3}
_SCORE = {torch.float32: 0}   # the only score dtype (config.SCORE_DTYPES)


def layout_meta(layout: RegionLayout) -> list[int]:
    """The layout as the flat int list the C++ op takes (order of ``Layout`` in mikv_common.h).

    ``score`` is the offset of the R fp32 slot scores (one per hi slot, next to the R tags)."""
    if layout.score_dtype not in _SCORE:
        raise ValueError(f"the C++ CPU op keeps fp32 scores only, not {layout.score_dtype}")
    return [layout.block_size, layout.head_dim, layout.bits, layout.group, layout.hi_slots, layout.region_bytes,
            layout.k_lo, layout.v_lo, layout.k_sz, layout.v_sz, layout.score, layout.tag, layout.k_hi,
            layout.v_hi, layout.balancer, _HI[layout.hi_dtype], _SCORE[layout.score_dtype],
            int(layout.has_balancer)]


def _f32(x: torch.Tensor) -> torch.Tensor:
    return finite_inputs(x.to(torch.float32)).contiguous()    # non-finite inputs: as the reference


def decode_step(regions: torch.Tensor, layout: RegionLayout, block_tables: torch.Tensor, pos: torch.Tensor,
                q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                config: MiKVConfig | None = None, own_from: torch.Tensor | None = None,
                shared_hi: torch.Tensor | None = None) -> torch.Tensor:
    """Balancer + store + attention + score accumulation (+ hi-set upkeep) for B requests (C++ op).

    ``block_tables`` int32 ``[B, M]`` (contiguous), ``pos`` int64 ``[B]`` (each request's context
    length = its new token's position); q ``[B, Hq, D]``, k/v ``[B, H, D]``; ``own_from`` /
    ``shared_hi`` int64 ``[B]`` (default 0: every block owned). Page effects and output
    equal ``reference.decode_balancer`` + ``store_at`` + ``gather_decode`` + ``attention_decode`` +
    ``accumulate_scores_decode`` (the hi slots' scores, to fp32 rounding), then, when ``config`` is
    given, ``maintain_hi_decode`` with its selection parameters and the step's mass (tags, hi copies
    and the promoted slots' scores byte for byte, given the same scores and mass). Returns
    ``[B, Hq, D]`` fp32.
    """
    upkeep = config is not None
    ratio = float(config.hi_ratio) if upkeep else 0.0
    sinks = int(config.sink_tokens) if upkeep else 0
    window = -1 if not upkeep or config.recent_window is None else int(config.recent_window)
    zeros = torch.zeros_like(pos)
    own_from = zeros if own_from is None else own_from.to(torch.int64).contiguous()
    shared_hi = zeros if shared_hi is None else shared_hi.to(torch.int64).contiguous()
    return load().decode_step(regions, layout_meta(layout), block_tables, pos, _f32(q), _f32(k), _f32(v),
                              float(scale), True, upkeep, ratio, sinks, window, own_from, shared_hi)


def forward_decode(regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, block_tables: torch.Tensor,
                   ctx_lens, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   own_from=None) -> torch.Tensor:
    """Same signature and page effects as ``reference.forward_decode`` (contexts may be 0)."""
    pos = torch.as_tensor(ctx_lens, dtype=torch.int64).reshape(-1).contiguous()
    bt = block_tables.to(torch.int32).contiguous()
    of = sh = None
    if own_from is not None:   # shared prefix columns (the C++ op checks own_from * N <= pos)
        of = torch.as_tensor(own_from, dtype=torch.int64).reshape(-1).contiguous()
        sh = ref.shared_hi_limits(config, layout, of)
    return decode_step(regions, layout, bt, pos, q, k, v, scale, config, of, sh)


def prefill_step(regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, block_tables: torch.Tensor,
                 ctx_lens: torch.Tensor, rows: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 scale: float, own_from: torch.Tensor | None = None) -> torch.Tensor:
    """All multi-token chunks of a step in one C++ call (see ``reference.forward_chunks``).

    ``block_tables`` int32 ``[C, M]``, ``ctx_lens`` int64 ``[C]``, ``rows`` int64 ``[C, 2]`` (each
    chunk's query rows ``[start, end)`` of q ``[Tq, Hq, D]``, k/v ``[Tq, H, D]``; chunks of distinct
    requests); ``own_from`` int64 ``[C]`` (default 0: every block owned). Returns ``[Tq, Hq, D]`` fp32,
    0 outside the chunks.
    """
    window = config.obs_window if config.scorer == "window" else -1
    recent = -1 if config.recent_window is None else int(config.recent_window)
    own_from = torch.zeros_like(ctx_lens) if own_from is None else own_from.to(torch.int64).contiguous()
    shared_hi = ref.shared_hi_limits(config, layout, own_from).contiguous()
    return load().prefill_step(regions, layout_meta(layout), block_tables, ctx_lens, rows, _f32(q), _f32(k), _f32(v),
                               float(scale), float(config.hi_ratio), int(config.sink_tokens), recent, int(window),
                               own_from, shared_hi)


def forward_chunks(regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, block_tables: torch.Tensor,
                   ctx_lens, rows, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   own_from=None) -> torch.Tensor:
    """Same signature and page effects as ``reference.forward_chunks`` (C++ :func:`prefill_step`)."""
    bt = block_tables.to(torch.int32).contiguous()
    ctx = torch.as_tensor(ctx_lens, dtype=torch.int64).reshape(-1).contiguous()
    rr = torch.as_tensor(rows, dtype=torch.int64).reshape(-1, 2).contiguous()
    of = None if own_from is None else torch.as_tensor(own_from, dtype=torch.int64).reshape(-1).contiguous()
    return prefill_step(regions, layout, config, bt, ctx, rr, q, k, v, scale, of)


def forward_request(regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, block_row: torch.Tensor,
                    ctx_len: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    own_from: int = 0) -> torch.Tensor:
    """Same signature and page effects as ``reference.forward_request`` (the fused C++ steps)."""
    if q.shape[0] == 1:
        return forward_decode(regions, layout, config, block_row.reshape(1, -1), [int(ctx_len)], q, k, v, scale,
                              [int(own_from)])
    rows = torch.tensor([[0, q.shape[0]]], dtype=torch.int64)
    return forward_chunks(regions, layout, config, block_row.reshape(1, -1), [int(ctx_len)], rows, q, k, v, scale,
                          [int(own_from)])


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
