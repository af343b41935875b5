"""The op contract: what every MiKV op set (batched torch, fused C++, Triton) implements.

An op set runs the page semantics of docs/design.md (balancer, store, two-tier attention, score
accumulation, hi-set upkeep, shared-prefix rules) for the rows of one step, planned once per step
(:mod:`.plan`). Its outputs and page bytes equal the oracle's, ``core.reference.forward_request``
per request (scores up to fp32 summation order), which ``tests/test_ops_contract.py`` checks for
every op set on the same pages.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ..config import MiKVConfig
from ..core.layout import RegionLayout
from .plan import ChunkPlan, DecodePlan, StepPlan


@runtime_checkable
class MiKVOps(Protocol):
    """One op set. ``regions`` is one layer's cache ``[num_blocks, H, region_bytes]`` uint8; q
    ``[T, Hq, D]``, k / v ``[T, H, D]`` (any float dtype); outputs are fp32 ``[T, Hq, D]``."""

    name: str

    def prepare(self, plan: StepPlan, layout: RegionLayout, config: MiKVConfig, num_heads: int,
                num_kv_heads: int) -> None:
        """Once per step, before the first layer: fill ``plan.decode.kernel`` / ``plan.chunks.kernel``
        with this op set's launch plan (groups, split sizes, device copies). No page access."""

    def decode(self, regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, plan: DecodePlan,
               q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """One token for each of the plan's B rows (q ``[B, Hq, D]``): balancer at position 0, store,
        attention over the page (+ the new token), score accumulation, hi upkeep. ``[B, Hq, D]``."""

    def decode_rotated(self, regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, plan: DecodePlan,
                       q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, rotation) -> torch.Tensor:
        """:meth:`decode` on the model's q / k / v of a rotated config (``core.rotation.Rotation``):
        as if each were rotated, decoded and the output rotated back (``ops.base.OpSet``)."""

    def chunks(self, regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, plan: ChunkPlan,
               q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Every multi-token chunk of the plan: chunk c is rows ``plan.rows[c]`` of q / k / v, one
        request each, at context ``plan.ctx[c]``. Returns ``[Tq, Hq, D]``, 0 outside the chunks."""

    def request(self, regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, block_row: torch.Tensor,
                ctx_len: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                own_from: int = 0) -> torch.Tensor:
        """One chunk (or one token) of one request, unplanned: the serial path of a step whose rows
        read shared blocks that another row writes in the same step."""
