"""The Triton op set (``TritonOps``; no vllm import), in a bounded workspace (:mod:`.workspace`).

* decode (one token per request): requests grouped by context length so each group's buffers
  fit the workspace (planned once per step in :meth:`TritonOps.prepare`: groups, device index and
  position tensors, block-table slices, split sizes, hi budgets); per group Triton store +
  :func:`decode.decode_attention` with the hi slots' scores accumulated in-kernel (the new token's
  mass to a ``[B, H]`` buffer), then the incremental hi-set upkeep kernel
  (:func:`upkeep.maintain_hi_decode`, one program per (request, KV head)) reading that buffer.
* prefill / multi-token chunks: Triton store, then the bounded torch chunked attention of
  ``ops.torch_chunks`` and the page steps of ``core.page``.
* layouts outside :func:`_common.supported` are served by the batched torch op set.
* shared prefix blocks (``own_from > 0``, prefix caching) are not implemented in the Triton path:
  such rows raise NotImplementedError (the engine keeps prefix caching off on CUDA,
  vllm_glue/engine_config.py).
"""

from __future__ import annotations

import torch

from ..config import MiKVConfig
from ..core.importance import hi_budget, recent_window
from ..core.layout import RegionLayout
from ..core.quant import finite_inputs
from ..ops.base import OpSet
from ..ops.plan import ChunkPlan, DecodePlan, StepPlan
from ..ops.torch_chunks import chunked_attention  # noqa: F401  (re-exported: tests, benchmarks)
from ..ops.torch_decode import decode_balancer
from ..ops.torch_ops import TorchOps, chunk_step
from ._common import supported
from .decode import decode_attention, default_block_n, plan_splits
from .store import store_tokens, write_tokens
from .upkeep import maintain_hi_decode
from .workspace import Dims, plan_decode_groups, workspace_bytes


SHARED_UNSUPPORTED = ("MiKV Triton ops: rows reading shared prefix blocks (own_from > 0) are not implemented; "
                      "serve with --no-enable-prefix-caching on CUDA (docs/usage.md)")


def _group_plan(layout: RegionLayout, config: MiKVConfig, bt: torch.Tensor, pos: torch.Tensor, max_ctx: int,
                dims: Dims) -> dict:
    """What every layer's launch of one decode group needs, computed once per step."""
    dev, n = bt.device, layout.block_size
    bt = bt[:, : max_ctx // n + 1].contiguous()          # blocks of positions [0, ctx] of the longest
    block_n = default_block_n(dev, layout.head_dim, max_ctx)
    tps, _ = plan_splits(pos.shape[0], dims.h, max_ctx, block_n, dev)
    plan = {"bt": bt, "pos": pos, "ctx32": pos.to(torch.int32), "max_ctx": max_ctx, "block_n": block_n, "tps": tps}
    if layout.hi_slots:
        length = pos + 1
        plan["budget"] = hi_budget(config, length, (pos // n + 1) * layout.hi_slots).contiguous()
        plan["rstart"] = (length - recent_window(config, plan["budget"])).contiguous()
    return plan


def _decode_group(regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, g: dict, q: torch.Tensor,
                  k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    dev, n, pos, bt = regions.device, layout.block_size, g["pos"], g["bt"]
    bal = decode_balancer(regions, layout, bt, pos, q, k)
    blk = bt.long().gather(1, (pos // n)[:, None])[:, 0]
    store_tokens(regions, layout, blk, pos % n, k, v, bal)
    # the new token's mass of this step ([B, H] fp32, within the group's workspace estimate): its
    # score as a candidate of the upkeep, and its slot's score if it is promoted
    new_mass = torch.empty(pos.shape[0], k.shape[1], device=dev, dtype=torch.float32) if layout.hi_slots else None
    out, _ = decode_attention(regions, layout, bt, g["ctx32"], q, k, v, scale, bal, max_ctx=g["max_ctx"],
                              need_mass=False, accumulate=True, new_mass=new_mass, tokens_per_split=g["tps"],
                              block_n=g["block_n"])
    if new_mass is not None:
        maintain_hi_decode(regions, layout, config, bt, pos, k, v, new_mass, budget=g["budget"], rstart=g["rstart"])
    return out


class TritonOps(OpSet):
    """Triton store, split-K decode attention with in-kernel scores and the upkeep kernel; chunks
    through the bounded torch attention. ``workspace`` (bytes, class attribute; None: the
    ``MIKV_VLLM_WORKSPACE_MB`` budget) bounds every temporary of one call."""

    name = "triton"
    workspace: int | None = None

    @classmethod
    def prepare(cls, plan: StepPlan, layout: RegionLayout, config: MiKVConfig, num_heads: int,
                num_kv_heads: int, workspace: int | None = None) -> None:
        d = plan.decode
        if d is None or d.shared or not supported(layout):
            if d is not None and not supported(layout):
                TorchOps.prepare(plan, layout, config, num_heads, num_kv_heads)
            return
        dims = Dims(num_heads, num_kv_heads, layout)
        dev = d.block_table.device
        ctx = d.pos.tolist()

        def splits_for(n_req: int, max_ctx: int) -> int:
            return plan_splits(n_req, dims.h, max_ctx, default_block_n(dev, layout.head_dim, max_ctx), dev)[1]

        budget = workspace if workspace is not None else (cls.workspace or workspace_bytes())
        groups = plan_decode_groups(dims, ctx, budget, splits_for)
        if len(groups) == 1:
            d.kernel["triton_groups"] = [(None, _group_plan(layout, config, d.block_table, d.pos_dev, d.max_pos, dims))]
            return
        out = []
        for g in groups:
            idx = torch.tensor(g, device=d.pos_dev.device)
            top = max(ctx[i] for i in g)                      # the group's columns only (no padding copy)
            table = d.block_table[:, : top // layout.block_size + 1][idx.to(dev)]
            out.append((idx.to(d.tokens.device), _group_plan(layout, config, table, d.pos_dev[idx], top, dims)))
        d.kernel["triton_groups"] = out

    @classmethod
    def decode(cls, regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, plan: DecodePlan,
               q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        if plan.shared:
            raise NotImplementedError(SHARED_UNSUPPORTED)
        if not supported(layout):
            return TorchOps.decode(regions, layout, config, plan, q, k, v, scale)
        q, k, v = finite_inputs(q), finite_inputs(k), finite_inputs(v)   # non-finite inputs: docs/design.md
        groups = plan.kernel["triton_groups"]
        if len(groups) == 1:
            return _decode_group(regions, layout, config, groups[0][1], q, k, v, scale)
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        for idx, g in groups:
            out[idx] = _decode_group(regions, layout, config, g, q[idx], k[idx], v[idx], scale)
        return out

    @classmethod
    def chunks(cls, regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, plan: ChunkPlan,
               q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        if plan.shared:
            raise NotImplementedError(SHARED_UNSUPPORTED)
        if not supported(layout):
            return TorchOps.chunks(regions, layout, config, plan, q, k, v, scale)
        q, k, v = finite_inputs(q), finite_inputs(k), finite_inputs(v)   # non-finite inputs: docs/design.md
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        for c, (start, end) in enumerate(plan.rows.tolist()):
            if end > start:
                out[start:end] = chunk_step(regions, layout, config, plan.block_table[c], int(plan.ctx[c]),
                                            q[start:end], k[start:end], v[start:end], scale, write=write_tokens)
        return out


def forward_decode(regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, block_tables: torch.Tensor,
                   ctx_lens, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, own_from=None, *,
                   workspace: int | None = None) -> torch.Tensor:
    """``reference.forward_decode``'s signature on the Triton op set; ``workspace`` overrides the
    byte budget of this call's temporaries."""
    from ..ops.plan import plan_for

    plan = plan_for(config, layout, block_tables, ctx_lens, own_from)
    TritonOps.prepare(StepPlan(decode=plan), layout, config, q.shape[1], k.shape[1], workspace=workspace)
    return TritonOps.decode(regions, layout, config, plan, q, k, v, scale)


forward_chunks = TritonOps.forward_chunks
forward_request = TritonOps.forward_request
