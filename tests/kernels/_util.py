"""Helpers for the kernel tests: configs, paged batches with stale blocks, page comparison."""

from __future__ import annotations

import torch

from mikv_vllm.config import MiKVConfig
from mikv_vllm.core import reference as ref
from mikv_vllm.core.layout import RegionLayout

SCALE = 0.125


def make_config(bits: int, hi_ratio: float, balancer: bool, **extra) -> MiKVConfig:
    """mikv / rtn / h2o config for (bits, r); ``extra``: other fields (group_size, hi_dtype, ...)."""
    if bits and hi_ratio:
        return MiKVConfig(policy="mikv", lo_bits=bits, hi_ratio=hi_ratio, balancer=balancer, **extra)
    if bits:
        return MiKVConfig(policy="rtn", lo_bits=bits, hi_ratio=0.0, sink_tokens=0, recent_window=0,
                          balancer=balancer, **extra)
    return MiKVConfig(policy="h2o", lo_bits=0, hi_ratio=hi_ratio, balancer=False, **extra)


def qkv(n: int, hq: int, h: int, d: int, gen: torch.Generator):
    """q ``[n, Hq, D]``, k/v ``[n, H, D]`` with outlier key channels."""
    chan = torch.ones(d)
    chan[torch.randperm(d, generator=gen)[: max(1, d // 16)]] = 8.0
    k = torch.randn(n, h, d, generator=gen) * chan + torch.randn(h, d, generator=gen)
    q = torch.randn(n, hq, d, generator=gen) * chan.sqrt()
    v = torch.randn(n, h, d, generator=gen)
    return q, k, v


def build_batch(config: MiKVConfig, block_size: int, head_dim: int, hkv: int, group: int, ctxs: list[int],
                seed: int = 0, room: int = 2):
    """Garbage pages, a finished stale request whose blocks get reused, then every request of
    ``ctxs`` prefilled (chunk + 2 single-token steps) with the reference.

    Returns (layout, regions, block_tables [B, nb] int32, q [B, Hq, D], k, v [B, H, D]) where q/k/v
    are each request's next token (position ``ctxs[i]``). Tables hold blocks for ``room`` more tokens.
    """
    gen = torch.Generator().manual_seed(seed)
    layout = RegionLayout.build(config, block_size, head_dim)
    n = block_size
    need = [-(-(c + room) // n) for c in ctxs]
    num_blocks = sum(need) + 3
    regions = torch.randint(0, 256, (num_blocks, hkv, layout.region_bytes), dtype=torch.uint8, generator=gen)
    pool = torch.randperm(num_blocks, generator=gen)
    hq = hkv * group
    stale_len = min(3 * n - 2, num_blocks * n)
    stale_row = pool[num_blocks - (-(-stale_len // n)):].flip(0)           # reused below, in another order
    q, k, v = qkv(stale_len, hq, hkv, head_dim, gen)
    ref.forward_request(regions, layout, config, stale_row, 0, q, k, v, SCALE)
    width = max(need)
    tables = torch.zeros(len(ctxs), width, dtype=torch.int32)
    nxt, qs, ks, vs = 0, [], [], []
    for i, c in enumerate(ctxs):
        tables[i, : need[i]] = pool[nxt: nxt + need[i]]
        nxt += need[i]
        q, k, v = qkv(c + 1, hq, hkv, head_dim, gen)
        start = 0
        for size in ([c - 2, 1, 1] if c > 2 else [c]):
            if size:
                ref.forward_request(regions, layout, config, tables[i], start, q[start:start + size],
                                    k[start:start + size], v[start:start + size], SCALE)
            start += size
        qs.append(q[c]), ks.append(k[c]), vs.append(v[c])
    return layout, regions, tables, torch.stack(qs), torch.stack(ks), torch.stack(vs)


def reference_decode(regions, layout, tables, ctxs, q, k, v, balancers=None):
    """Per-request reference gather + attention (no page mutation): outputs, masses."""
    outs, masses = [], []
    for i, c in enumerate(ctxs):
        b = balancers[i] if balancers is not None else None
        kc, vc, ok = ref.gather_context(regions, layout, tables[i], c, b)
        o, m = ref.attention(q[i:i + 1], kc, vc, ok, k[i:i + 1], v[i:i + 1], SCALE, 0 if layout.hi_slots else None)
        outs.append(o[0])
        masses.append(m)
    return torch.stack(outs), masses


def stored_balancers(regions, layout, tables, ctxs):
    """[B, H, D] stored balancers (ones for requests without context) or None."""
    if not layout.has_balancer:
        return None
    h, d = regions.shape[1], layout.head_dim
    return torch.stack([ref.load_balancer(regions, layout, tables[i]) if c else torch.ones(h, d)
                        for i, c in enumerate(ctxs)])


def assert_pages_match(a: torch.Tensor, b: torch.Tensor, layout: RegionLayout, score_rtol: float = 1e-5,
                       before: torch.Tensor | None = None):
    """Every byte equal except the hi slots' scores (close; garbage compared bit-wise). With
    ``before`` (the pages before the step that made ``a``): every score ``a`` left as it was in
    ``before`` must be bit-for-bit that in ``b`` too (a write to a wrong slot shows even where a
    garbage score is too large for the tolerance to see an added mass)."""
    lo, hi = layout.score, layout.score + layout.views(a).score.shape[-1] * layout.score_dtype.itemsize
    a2, b2 = a.clone(), b.clone()
    a2[..., lo:hi] = 0
    b2[..., lo:hi] = 0
    diff = (a2 != b2).nonzero()
    assert diff.numel() == 0, f"{diff.shape[0]} bytes differ, first at (block, head, byte) {diff[0].tolist()}"
    sa, sb = layout.views(a).score, layout.views(b).score
    torch.testing.assert_close(sa, sb, rtol=score_rtol, atol=1e-6, equal_nan=True)
    if before is not None:
        bits = [x.view(torch.int32) for x in (sa, sb, layout.views(before).score)]
        kept = bits[0] == bits[2]
        moved = (kept & (bits[1] != bits[0])).nonzero()
        assert moved.numel() == 0, (f"{moved.shape[0]} scores changed that the reference left as they were, "
                                    f"first at (block, head, slot) {moved[0].tolist()}")
