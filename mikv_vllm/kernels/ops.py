"""The Triton op set (``TritonOps``; no vllm import).

* decode (one token per request): :func:`step.decode_step`, six launches on the persistent
  :class:`step.DecodeBuffers` that :meth:`TritonOps.prepare` makes at the first step (sized by the
  plan builder's bounds) and refills once per step (row lengths, hi budgets); no torch op, no
  host read, padded rows (seq_len 0) are no-ops: what a captured CUDA graph replays; a rotated
  config's decode-only step (``decode_rotated``) rotates in the store kernel and back in the merge.
* prefill / multi-token chunks: Triton store, then the bounded torch chunked attention of
  ``ops.torch_chunks`` and the page steps of ``core.page``.
* layouts outside :func:`_common.supported` are served by the batched torch op set.
* shared prefix blocks (``own_from > 0``, prefix caching; docs/design.md "Shared blocks"): the
  decode kernels take each row's ``own_from`` / ``shared_hi`` from the :class:`step.DecodeBuffers`
  (read the shared blocks' lo copies and their hi copies up to ``shared_hi``, write scores, tags
  and hi slots in the owned blocks only); chunks pass them to the torch chunk step.
"""

from __future__ import annotations

import torch

from ..config import MiKVConfig
from ..core.layout import RegionLayout
from ..core.rotation import rotation_for
from ..ops.base import OpSet
from ..ops.plan import ChunkPlan, DecodePlan, StepPlan
from ..ops.torch_chunks import chunked_attention  # noqa: F401  (re-exported: tests, benchmarks)
from ..ops.torch_ops import TorchOps, run_chunks
from ._common import supported
from .store import write_tokens
from .step import DecodeBuffers, decode_step


class TritonOps(OpSet):
    """Triton store, split-K decode attention with in-kernel scores and the upkeep kernel; chunks
    through the bounded torch attention. ``workspace`` (bytes, class attribute; None: the
    ``MIKV_VLLM_WORKSPACE_MB`` budget) bounds every temporary of one call."""

    name = "triton"
    workspace: int | None = None

    @classmethod
    def prepare(cls, plan: StepPlan, layout: RegionLayout, config: MiKVConfig, num_heads: int,
                num_kv_heads: int, workspace: int | None = None) -> None:
        """Once per step: the decode rows' lengths, shared-prefix bounds, hi budgets and block table
        into the persistent :class:`step.DecodeBuffers` (made at the first step, sized by the plan
        builder's bounds)."""
        d = plan.decode
        if d is None or not supported(layout):
            if d is not None and not supported(layout):
                TorchOps.prepare(plan, layout, config, num_heads, num_kv_heads)
            return
        table = d.full_table if d.full_table is not None else d.block_table
        if table.stride(-1) != 1:
            table = table.contiguous()
        rows = max(d.size, d.state.get("max_rows", 0))
        max_pos = table.shape[1] * layout.block_size
        buf = d.state.get("triton_decode")
        if (buf is None or buf.rows < d.size or buf.max_pos < max_pos or buf.out.shape[1:] != (num_heads, layout.head_dim)
                or buf.new_mass.shape[1] != num_kv_heads or (config.rotation and buf.rot is None)):
            buf = DecodeBuffers.make(layout, num_heads, num_kv_heads, rows, max_pos, table.device,
                                     rotation=config.rotation)
            d.state["triton_decode"] = buf
        buf.fill(layout, config, d.pos, *((d.own_from, d.shared_hi) if d.shared else ()))
        d.kernel["triton_step"] = (buf, table)

    @staticmethod
    def _on_torch(layout: RegionLayout) -> bool:
        """A layout outside ``supported`` runs on the torch op set."""
        return not supported(layout)

    @classmethod
    def decode(cls, regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, plan: DecodePlan,
               q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Six launches, no torch op (``step.decode_step``); inputs are sanitized in the kernels."""
        if cls._on_torch(layout):
            return TorchOps.decode(regions, layout, config, plan, q, k, v, scale)
        buf, table = plan.kernel["triton_step"]
        return decode_step(regions, layout, config, buf, table, q, k, v, scale)

    @classmethod
    def decode_rotated(cls, regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, plan: DecodePlan,
                       q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, rotation) -> torch.Tensor:
        """The rotation folded into the six launches (``kernels/rotate.py``): still no torch op."""
        if cls._on_torch(layout):
            return TorchOps.decode_rotated(regions, layout, config, plan, q, k, v, scale, rotation)
        buf, table = plan.kernel["triton_step"]
        if buf.rot is None or not (rotation is rotation_for(layout.head_dim)
                                   or torch.equal(rotation.matrix, rotation_for(layout.head_dim).matrix)):
            raise ValueError("TritonOps.decode_rotated folds core.rotation.rotation_for(head_dim) only, on buffers "
                             "made for a rotated config")
        return decode_step(regions, layout, config, buf, table, q, k, v, scale, rotate=True)

    @classmethod
    def chunks(cls, regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, plan: ChunkPlan,
               q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        if cls._on_torch(layout):
            return TorchOps.chunks(regions, layout, config, plan, q, k, v, scale)
        return run_chunks(regions, layout, config, plan, q, k, v, scale, write=write_tokens)


def forward_decode(regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, block_tables: torch.Tensor,
                   ctx_lens, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, own_from=None, *,
                   workspace: int | None = None) -> torch.Tensor:
    """``reference.forward_decode``'s signature on the Triton op set (``workspace``: accepted and
    unused: the decode step's buffers are sized by the plan's bounds, :class:`step.DecodeBuffers`)."""
    from ..ops.plan import plan_for

    plan = plan_for(config, layout, block_tables, ctx_lens, own_from)
    TritonOps.prepare(StepPlan(decode=plan), layout, config, q.shape[1], k.shape[1], workspace=workspace)
    return TritonOps.decode(regions, layout, config, plan, q, k, v, scale)


forward_chunks = TritonOps.forward_chunks
forward_request = TritonOps.forward_request
