"""Shared helpers for the core tests: caches, structured random K/V, dense attention."""

from __future__ import annotations

import math

import torch

from mikv_vllm.config import MiKVConfig
from mikv_vllm.core.layout import RegionLayout
from mikv_vllm.core.reference import forward_request

# INT3, r = 0.1, fp16 hi: the former default (ten hi tokens in a hundred, 2 slots per 16-token block),
# the scenario the selection and shared-prefix tests work out by hand; preset("mikv") is tested too.
INT3_R10 = MiKVConfig(name="int3-r0.1", policy="mikv", lo_bits=3, hi_ratio=0.1, hi_dtype="float16")


def make_regions(layout: RegionLayout, num_blocks: int, num_kv_heads: int, garbage: bool = False,
                 seed: int = 0) -> torch.Tensor:
    """A flat ``[num_blocks, H, region_bytes]`` cache, zeroed or filled with random bytes."""
    if not garbage:
        return torch.zeros(num_blocks, num_kv_heads, layout.region_bytes, dtype=torch.uint8)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (num_blocks, num_kv_heads, layout.region_bytes), dtype=torch.uint8,
                         generator=gen)


def structured_qkv(length: int, hq: int, hkv: int, d: int, seed: int = 0):
    """q ``[L, Hq, D]``, k/v ``[L, Hkv, D]`` with outlier key channels and a shared key offset."""
    gen = torch.Generator().manual_seed(seed)
    chan = torch.ones(d)
    chan[torch.randperm(d, generator=gen)[: max(1, d // 16)]] = 8.0           # outlier channels
    k = torch.randn(length, hkv, d, generator=gen) * chan + torch.randn(hkv, d, generator=gen)
    q = torch.randn(length, hq, d, generator=gen) * chan.sqrt()
    v = torch.randn(length, hkv, d, generator=gen) + 0.5 * torch.randn(hkv, d, generator=gen)
    return q, k, v


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    offset: int = 0) -> torch.Tensor:
    """Plain fp32 causal GQA attention: q ``[T, Hq, D]`` at positions ``offset + i`` over k/v ``[S, H, D]``."""
    t, hq, d = q.shape
    s, h = k.shape[:2]
    kk = k.float().repeat_interleave(hq // h, dim=1)
    vv = v.float().repeat_interleave(hq // h, dim=1)
    logits = torch.einsum("thd,shd->hts", q.float(), kk) * scale
    mask = torch.arange(s)[None, :] <= (offset + torch.arange(t))[:, None]
    p = torch.softmax(logits.masked_fill(~mask, -math.inf), dim=-1)
    return torch.einsum("hts,shd->thd", p, vv)


def run_request(regions: torch.Tensor, layout: RegionLayout, config: MiKVConfig, block_row: torch.Tensor,
                q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunks: list[int], scale: float) -> torch.Tensor:
    """Feed a request through ``forward_request`` in chunks of the given sizes; concatenated outputs."""
    outs, start = [], 0
    for size in chunks:
        end = start + size
        outs.append(forward_request(regions, layout, config, block_row, start, q[start:end], k[start:end],
                                    v[start:end], scale))
        start = end
    return torch.cat(outs)


def decode_after_prefill(cfg: MiKVConfig, path: str, n: int, d: int, hq: int, hkv: int, scale: float,
                         qkv_seed: int, page_seed: int, length: int = 40):
    """Prefill ``length`` tokens (oracle), then decode one more through ``path`` ("oracle" or "torch",
    the batched torch op set). Returns (q, k, v of all length + 1 tokens, the decode output)."""
    from mikv_vllm.ops.torch_ops import TorchOps

    lay = RegionLayout.build(cfg, n, d)
    q, k, v = structured_qkv(length + 1, hq, hkv, d, seed=qkv_seed)
    regions = make_regions(lay, 5, hkv, garbage=True, seed=page_seed)
    row = torch.tensor([3, 0, 4, 1])
    forward_request(regions, lay, cfg, row, 0, q[:length], k[:length], v[:length], scale)
    new = (q[length:], k[length:], v[length:])
    if path == "oracle":
        out = forward_request(regions, lay, cfg, row, length, *new, scale)
    else:
        out = TorchOps.forward_decode(regions, lay, cfg, row[None], [length], *new, scale)
    return q, k, v, out


def assert_pages(layout: RegionLayout, got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    """Two pages equal byte for byte, except the hi slots' scores, which need only agree to fp32 rounding
    (two implementations sum the attention mass in different orders)."""
    gv, wv = layout.views(got), layout.views(want)
    torch.testing.assert_close(gv.score, wv.score, rtol=1e-5, atol=1e-6, equal_nan=True, msg=lambda m: f"{what}: {m}")
    same = got.clone()
    layout.views(same).score.copy_(wv.score)
    diff = (same != want).nonzero()
    assert diff.numel() == 0, f"{what}: {diff.shape[0]} bytes differ, first at {diff[:3].tolist()}"
