"""The fused C++ op set for CPU (``CpuOps``; no vllm import).

* decode (one token per request, any context incl. 0): :func:`decode_step` = the C++ op
  (balancer, store, attention over the packed page, score accumulation and the incremental hi-set
  upkeep, per (request, KV head) in parallel; the upkeep equals the oracle's byte for byte).
* multi-token chunks: :func:`prefill_step` = the C++ op, every chunk of a step in one call
  (balancer, store, attention over the packed page, score mass, hi-set upkeep, per (chunk, KV head)
  in parallel).
* shared prefix blocks (prefix caching): ``own_from`` / ``shared_hi`` per row from the step plan.

The two calls into the C++ module are :func:`_decode_call` and :func:`_prefill_call` (one place
each, for signature changes).
"""

from __future__ import annotations

import functools

import torch

from ..config import MiKVConfig
from ..core.layout import RegionLayout
from ..ops.base import OpSet
from ..core.page import shared_hi_limits
from ..ops.plan import ChunkPlan, DecodePlan
from .build import load

_HI = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float8_e4m3fn: 3}
_SCORE = {torch.float32: 0}   # the only score dtype (config.SCORE_DTYPES)
_META = {"fp16": 0, "fp8-scale": 1}   # config.GROUP_METAS


def layout_fields(layout: RegionLayout) -> dict[str, int | bool]:
    """The keyword fields of the C++ op's ``Layout`` (mikv_layout.h) for ``layout``: sizes, key and
    value widths, byte offsets of the sub-arrays, dtype codes (``score``: the R fp32 slot scores, one
    per hi slot; ``group_meta``: the (scale, zero) record format)."""
    if layout.score_dtype not in _SCORE:
        raise ValueError(f"the C++ CPU op keeps fp32 scores only, not {layout.score_dtype}")
    return dict(block_size=layout.block_size, head_dim=layout.head_dim, k_bits=layout.k_bits, v_bits=layout.v_bits,
                group=layout.group, hi_slots=layout.hi_slots, region_bytes=layout.region_bytes, k_lo=layout.k_lo,
                v_lo=layout.v_lo, k_sz=layout.k_sz, v_sz=layout.v_sz, tag=layout.tag, score=layout.score,
                k_hi=layout.k_hi, v_hi=layout.v_hi, balancer=layout.balancer, hi_dtype=_HI[layout.hi_dtype],
                score_dtype=_SCORE[layout.score_dtype], group_meta=_META[layout.group_meta],
                has_balancer=bool(layout.has_balancer))


def cpp_layout(layout: RegionLayout, module=None):
    """``layout`` as the C++ ``Layout`` of ``module`` (default: the loaded op), checked once in C++
    at construction and cached per (module, layout): each ISA variant's module has its own class."""
    return _cpp_layout(load() if module is None else module, layout)


@functools.lru_cache(maxsize=64)
def _cpp_layout(module, layout: RegionLayout):
    return module.Layout(**layout_fields(layout))


@functools.lru_cache(maxsize=64)
def _selection(config: MiKVConfig) -> tuple[float, int, int, int]:
    """(hi ratio, sink tokens, recent window or -1, observation window or -1) of a config."""
    recent = -1 if config.recent_window is None else int(config.recent_window)
    window = int(config.obs_window) if config.scorer == "window" else -1
    return float(config.hi_ratio), int(config.sink_tokens), recent, window


def _decode_call(regions, layout, block_tables, pos, q, k, v, scale, upkeep, selection, own_from, shared_hi):
    ratio, sinks, recent, _ = selection
    module = load()
    return module.decode_step(regions, cpp_layout(layout, module), block_tables, pos, q, k, v, float(scale), True,
                              upkeep, ratio, sinks, recent, own_from, shared_hi)


def _prefill_call(regions, layout, block_tables, ctx, rows, q, k, v, scale, selection, own_from, shared_hi):
    ratio, sinks, recent, window = selection
    module = load()
    return module.prefill_step(regions, cpp_layout(layout, module), block_tables, ctx, rows, q, k, v, float(scale),
                               ratio, sinks, recent, window, own_from, shared_hi)


def _f32(x: torch.Tensor) -> torch.Tensor:
    """q / k / v as the C++ op takes them: fp32, contiguous (no copy when they are; the op itself
    applies ``quant.finite_inputs`` to them, mikv_steps.h)."""
    return x if x.dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()


def decode_step(regions: torch.Tensor, layout: RegionLayout, block_tables: torch.Tensor, pos: torch.Tensor,
                q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                config: MiKVConfig | None = None, own_from: torch.Tensor | None = None,
                shared_hi: torch.Tensor | None = None) -> torch.Tensor:
    """Balancer + store + attention + score accumulation (+ hi-set upkeep) for B requests (C++ op).

    ``block_tables`` int32 ``[B, M]`` (contiguous), ``pos`` int64 ``[B]`` (each request's context
    length = its new token's position); q ``[B, Hq, D]``, k/v ``[B, H, D]``; ``own_from`` /
    ``shared_hi`` int64 ``[B]`` (default 0: every block owned). Without ``config`` the hi-set
    upkeep is skipped (benchmarks time the step without it). Returns ``[B, Hq, D]`` fp32.
    """
    selection = _selection(config) if config is not None else (0.0, 0, -1, -1)
    zeros = torch.zeros_like(pos)
    own_from = zeros if own_from is None else own_from.to(torch.int64).contiguous()
    shared_hi = zeros if shared_hi is None else shared_hi.to(torch.int64).contiguous()
    return _decode_call(regions, layout, block_tables, pos, _f32(q), _f32(k), _f32(v), scale, config is not None,
                        selection, own_from, shared_hi)


def prefill_step(regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, block_tables: torch.Tensor,
                 ctx_lens: torch.Tensor, rows: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 scale: float, own_from: torch.Tensor | None = None) -> torch.Tensor:
    """All multi-token chunks of a step in one C++ call (``reference.forward_chunks`` semantics).

    ``block_tables`` int32 ``[C, M]``, ``ctx_lens`` int64 ``[C]``, ``rows`` int64 ``[C, 2]`` (each
    chunk's query rows ``[start, end)`` of q ``[Tq, Hq, D]``, k/v ``[Tq, H, D]``; chunks of distinct
    requests); ``own_from`` int64 ``[C]`` (default 0: every block owned). Returns ``[Tq, Hq, D]`` fp32,
    0 outside the chunks.
    """
    own_from = torch.zeros_like(ctx_lens) if own_from is None else own_from.to(torch.int64).contiguous()
    shared_hi = shared_hi_limits(config, layout, own_from).contiguous()
    return _prefill_call(regions, layout, block_tables, ctx_lens, rows, _f32(q), _f32(k), _f32(v), scale,
                         _selection(config), own_from, shared_hi)


class CpuOps(OpSet):
    """The fused C++ decode and prefill steps on the step plan (nothing to prepare: the plan's
    host tensors are what the C++ op takes)."""

    name = "cpu"

    @classmethod
    def decode(cls, regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, plan: DecodePlan,
               q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        return _decode_call(regions, layout, plan.block_table, plan.pos, _f32(q), _f32(k), _f32(v), scale, True,
                            _selection(config), plan.own_from, plan.shared_hi)

    @classmethod
    def chunks(cls, regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, plan: ChunkPlan,
               q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        return _prefill_call(regions, layout, plan.block_table, plan.ctx, plan.rows, _f32(q), _f32(k), _f32(v),
                             scale, _selection(config), plan.own_from, plan.shared_hi)


forward_decode = CpuOps.forward_decode
forward_chunks = CpuOps.forward_chunks
forward_request = CpuOps.forward_request
