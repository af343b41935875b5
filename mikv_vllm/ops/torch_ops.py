"""The batched torch op set (``MIKV_VLLM_OPS=torch``; any device): the decode rows of a step in
vectorised groups (:mod:`.torch_decode`), each chunk with the bounded online-softmax attention of
:mod:`.torch_chunks` and the page steps of ``core.page``."""

from __future__ import annotations

import torch

from ..config import MiKVConfig
from ..core.layout import RegionLayout
from ..core.quant import finite_inputs
from ..core.page import accumulate_scores, first_voting_row, maintain_hi, request_balancer, write_tokens
from .base import OpSet
from .plan import ChunkPlan, DecodePlan, StepPlan
from .torch_chunks import chunked_attention
from .torch_decode import decode_groups, decode_rows


class TorchOps(OpSet):
    """Batched torch: decode in groups of similar context (``torch_decode.decode_groups``, planned
    once per step), chunks one request at a time."""

    name = "torch"

    @classmethod
    def prepare(cls, plan: StepPlan, layout: RegionLayout, config: MiKVConfig, num_heads: int,
                num_kv_heads: int) -> None:
        d = plan.decode
        if d is None:
            return
        pos = d.pos.tolist()
        groups = decode_groups(pos)
        if len(groups) > 1:   # index tensors and block-table slices of each group, for every layer
            dev = d.block_table.device
            d.kernel["torch_groups"] = [
                (idx := torch.tensor(g, device=d.tokens.device), d.block_table[idx.to(dev)],
                 d.pos_dev[idx.to(d.pos_dev.device)], d.own_from[g] if d.shared else None,
                 d.shared_hi[g] if d.shared else None)
                for g in groups]

    @classmethod
    def decode(cls, regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, plan: DecodePlan,
               q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        q, k, v = finite_inputs(q), finite_inputs(k), finite_inputs(v)   # non-finite inputs: docs/design.md
        dev = regions.device
        own = (plan.own_from.to(dev), plan.shared_hi.to(dev)) if plan.shared else (None, None)
        groups = plan.kernel.get("torch_groups")
        if groups is None:
            return decode_rows(regions, layout, config, plan.block_table, plan.pos_dev, q, k, v, scale, *own)
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        for idx, bt, pos, of, sh in groups:
            of, sh = (of.to(dev), sh.to(dev)) if of is not None else (None, None)
            out[idx] = decode_rows(regions, layout, config, bt, pos, q[idx], k[idx], v[idx], scale, of, sh)
        return out

    @classmethod
    def chunks(cls, regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, plan: ChunkPlan,
               q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        return run_chunks(regions, layout, config, plan, q, k, v, scale)


def run_chunks(regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, plan: ChunkPlan,
               q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, write=write_tokens) -> torch.Tensor:
    """Every chunk of a step, one :func:`chunk_step` each (``write``: the lo store, as there)."""
    q, k, v = finite_inputs(q), finite_inputs(k), finite_inputs(v)   # non-finite inputs: docs/design.md
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for c, (start, end) in enumerate(plan.rows.tolist()):
        if end > start:
            out[start:end] = chunk_step(regions, layout, config, plan.block_table[c], int(plan.ctx[c]),
                                        q[start:end], k[start:end], v[start:end], scale,
                                        int(plan.own_from[c]), int(plan.shared_hi[c]), write=write)
    return out


def chunk_step(regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, block_row: torch.Tensor,
               ctx_len: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               own_from: int = 0, shared_hi: int = 0, write=write_tokens) -> torch.Tensor:
    """One chunk of one request (``reference.forward_request`` semantics) with the bounded chunked
    attention; ``write`` stores the lo copies (the Triton op set passes its store kernel)."""
    if own_from < 0 or own_from * layout.block_size > ctx_len:
        raise ValueError(f"own_from {own_from} (block size {layout.block_size}) must be in "
                         f"[0, ctx_len // block_size] for ctx_len {ctx_len}: a request writes only owned blocks")
    b = request_balancer(regions, layout, block_row, ctx_len, q, k)
    write(regions, layout, block_row, ctx_len, k, v, b)
    vote_from = first_voting_row(config, q.shape[0]) if layout.hi_slots else None
    out, mass = chunked_attention(regions, layout, block_row, ctx_len, q, k, v, scale, b, vote_from,
                                  own_from=own_from, shared_hi=shared_hi)
    if mass is not None:
        accumulate_scores(regions, layout, block_row, ctx_len, mass, own_from)
        maintain_hi(regions, layout, config, block_row, ctx_len, k, v, mass, own_from)
    return out
