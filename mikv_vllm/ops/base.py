"""What the op sets share: the unplanned call signatures (tests, benchmarks, the serial path)
built on the planned ones, so every call goes through one implementation per op set."""

from __future__ import annotations

import torch

from ..config import MiKVConfig
from ..core.layout import RegionLayout
from ..core.rotation import Rotation
from .plan import DecodePlan, StepPlan, plan_for


class OpSet:
    """Base of the op sets: subclasses define ``name``, ``decode``, ``chunks`` (planned) and may
    override ``prepare``; the ``forward_*`` classmethods keep the oracle's signatures."""

    name = "?"

    @classmethod
    def prepare(cls, plan: StepPlan, layout: RegionLayout, config: MiKVConfig, num_heads: int,
                num_kv_heads: int) -> None:
        return None

    @classmethod
    def decode_rotated(cls, regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, plan: DecodePlan,
                       q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                       rotation: Rotation) -> torch.Tensor:
        """:meth:`decode` of a rotated config on the model's q / k / v: each rotated
        (``rotation.rotate``), decoded, the output rotated back (``rotation.unrotate``), fp32. What
        the backend's decode-only step calls; an op set may fold the rotation into its kernels."""
        q, k, v = (rotation.rotate(x) for x in (q, k, v))
        return rotation.unrotate(cls.decode(regions, layout, config, plan, q, k, v, scale))

    @classmethod
    def forward_decode(cls, regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig,
                       block_tables: torch.Tensor, ctx_lens, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       scale: float, own_from=None) -> torch.Tensor:
        """``reference.forward_decode``'s signature: plans the rows, then :meth:`decode`."""
        plan = plan_for(config, layout, block_tables, ctx_lens, own_from)
        cls.prepare(StepPlan(decode=plan), layout, config, q.shape[1], k.shape[1])
        return cls.decode(regions, layout, config, plan, q, k, v, scale)

    @classmethod
    def forward_chunks(cls, regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig,
                       block_tables: torch.Tensor, ctx_lens, rows, q: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, scale: float, own_from=None) -> torch.Tensor:
        """``reference.forward_chunks``'s signature: plans the chunks, then :meth:`chunks`."""
        plan = plan_for(config, layout, block_tables, ctx_lens, own_from, rows)
        cls.prepare(StepPlan(chunks=plan), layout, config, q.shape[1], k.shape[1])
        return cls.chunks(regions, layout, config, plan, q, k, v, scale)

    @classmethod
    def forward_request(cls, regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig,
                        block_row: torch.Tensor, ctx_len: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        scale: float, own_from: int = 0) -> torch.Tensor:
        """``reference.forward_request``'s signature: one decode row or one chunk."""
        row = block_row.reshape(1, -1)
        if q.shape[0] == 1:
            return cls.forward_decode(regions, layout, config, row, [int(ctx_len)], q, k, v, scale, [int(own_from)])
        rows = torch.tensor([[0, q.shape[0]]], dtype=torch.int64)
        return cls.forward_chunks(regions, layout, config, row, [int(ctx_len)], rows, q, k, v, scale,
                                  [int(own_from)])

    @classmethod
    def request(cls, regions, layout, config, block_row, ctx_len, q, k, v, scale, own_from: int = 0):
        return cls.forward_request(regions, layout, config, block_row, ctx_len, q, k, v, scale, own_from)
