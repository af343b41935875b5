"""The Triton hi-set upkeep kernel vs ``tdec.maintain_hi_decode`` (interpreted), byte for byte."""

import math

import pytest
import torch
import triton
import triton.language as tl

from mikv_vllm.config import MiKVConfig, preset
from mikv_vllm.core import reference as ref
from mikv_vllm.ops import torch_decode as tdec
from mikv_vllm.core.layout import RegionLayout
from mikv_vllm.kernels.upkeep import _fp8e4m3_rtne, maintain_hi_decode
from mikv_vllm.kernels.upkeep_tiled import maintain_hi_tiled

HKV, N, D = 2, 8, 16
SCALE = 1 / math.sqrt(D)


def _setup(cfg, prompts, steps, seed=0):
    """Garbage pages, requests prefilled with the reference; per-request q/k/v for every position."""
    lay = RegionLayout.build(cfg, N, D)
    per_req = [-(-(p + steps) // N) for p in prompts]
    num_blocks = sum(per_req) + 2
    gen = torch.Generator().manual_seed(seed)
    regions = torch.randint(0, 256, (num_blocks, HKV, lay.region_bytes), dtype=torch.uint8, generator=gen)
    perm = torch.randperm(num_blocks, generator=gen)
    table = perm[torch.randint(0, num_blocks, (len(prompts), max(per_req) + 1), generator=gen)]  # foreign pad
    used = 0
    for i, nb in enumerate(per_req):
        table[i, :nb] = perm[used:used + nb]
        used += nb
    data = [tuple(torch.randn(p + steps, h, D, generator=gen) for h in (2 * HKV, HKV, HKV)) for p in prompts]
    for (q, k, v), p, row in zip(data, prompts, table):
        if p:
            ref.forward_request(regions, lay, cfg, row, 0, q[:p], k[:p], v[:p], SCALE)
    return lay, regions, table.int(), data


def _run(cfg, prompts, steps, seed=0, plant=None, poke_mass=None):
    """Reference decode steps; before each step's upkeep, the kernel's and the reference's upkeep
    must leave identical pages (tags, the slots' scores, hi copies). The kernel gets the new token's
    mass as ``[B, H]`` (what decode_attention writes) on even steps, the reference's position-indexed
    ``[B, H, S]`` on odd ones."""
    lay, regions, table, data = _setup(cfg, prompts, steps, seed)
    for step in range(steps):
        pos = torch.tensor([p + step for p in prompts])
        q, k, v = (torch.stack([d[j][c] for d, c in zip(data, pos.tolist())]) for j in range(3))
        if plant is not None:
            plant(lay, regions, table, pos, step)
        b = tdec.decode_balancer(regions, lay, table, pos, q, k)
        blk = table.long().gather(1, (pos // N)[:, None])[:, 0]
        ref.store_at(regions, lay, blk, pos % N, k, v, b)
        k_ctx, v_ctx, valid = tdec.gather_decode(regions, lay, table, pos, b)
        _, mass = tdec.attention_decode(q, k_ctx, v_ctx, valid, pos, k, v, SCALE)
        tdec.accumulate_scores_decode(regions, lay, table, pos, mass)
        if poke_mass is not None:
            poke_mass(mass, pos, step)
        mine = regions.clone()
        tdec.maintain_hi_decode(regions, lay, cfg, table, pos, k, v, mass)
        new_mass = mass.gather(2, pos[:, None, None].expand(-1, HKV, 1))[..., 0]
        tiled = mine.clone()
        maintain_hi_decode(mine, lay, cfg, table, pos, k, v, new_mass if step % 2 == 0 else mass)
        diff = (mine != regions).nonzero()
        assert diff.numel() == 0, f"step {step}: {diff.shape[0]} bytes differ, first at {diff[:3].tolist()}"
        # the decode step's tiled upkeep (kernels/upkeep_tiled.py), tiles of 2 slots
        maintain_hi_tiled(tiled, lay, cfg, table, pos, k, v, new_mass, tile=2)
        diff = (tiled != regions).nonzero()
        assert diff.numel() == 0, f"tiled, step {step}: {diff.shape[0]} bytes differ, first at {diff[:3].tolist()}"
    return lay, regions, table


CASES = {
    "mikv-paper": preset("mikv-paper"),                                  # 2 slots per block of 8, 4 sinks
    "window-3-fp32": MiKVConfig(policy="mikv", lo_bits=4, hi_ratio=0.3, recent_window=3, hi_dtype="float32"),
    "bf16-no-sinks": MiKVConfig(policy="mikv", lo_bits=8, hi_ratio=0.25, sink_tokens=0, hi_dtype="bfloat16",
                                balancer=False),
    "no-recent-window": MiKVConfig(policy="mikv", lo_bits=4, hi_ratio=0.25, recent_window=0, sink_tokens=1),
    "h2o": preset("h2o"),
    "rtn": preset("rtn"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_upkeep_kernel_matches_reference(name):
    _run(CASES[name], [0, 3, 8, 21], 40)


def test_upkeep_kernel_stale_tags_several_losers_and_clamp():
    """Planted stale tags (several losers in one step, duplicates, tags past the context), saturated /
    NaN slot scores and new-token masses, and K/V beyond fp16's range (hi copies clamped as
    quant.to_hi)."""
    cfg = preset("mikv-paper")

    def plant(lay, regions, table, pos, step):
        if step % 7:
            return
        views, r = lay.views(regions), lay.hi_slots
        g = torch.Generator().manual_seed(step)
        for i, p in enumerate(pos.tolist()):
            if p < 2:
                continue
            nb = p // N + 1
            blocks = table[i, :nb].long()
            slots = torch.randperm(nb * r, generator=g)[: nb * r // 2 + 1]
            vals = torch.randint(1, p + 1, (slots.numel(),), generator=g).int()
            vals[0] = p + 3                                            # past the context
            views.tag[blocks[slots // r], :, slots % r] = vals[:, None]
            kinds = torch.tensor([torch.finfo(torch.float32).max, float("nan"), -1.0, 0.5])
            pick = torch.randint(0, 4, (slots.numel(), HKV), generator=g)
            views.score[blocks[slots // r], :, slots % r] = kinds[pick]       # the planted slots' scores
            views.k_hi[blocks[slots // r], :, slots % r] = 0
            views.v_hi[blocks[slots // r], :, slots % r] = 0

    def poke_mass(mass, pos, step):
        if step % 5 == 0:   # the new token's mass: infinite (saturates), NaN (ranks as -inf), huge
            for i, p in enumerate(pos.tolist()):
                mass[i, :, p] = torch.tensor([float("inf"), float("nan"), 3e38, 0.0])[(i + step) % 4]

    lay, regions, table = _run(cfg, [5, 19, 30], 40, seed=3, plant=plant, poke_mass=poke_mass)
    _, _, _, data = _setup(cfg, [2], 3, seed=9)
    pos = torch.tensor([2])
    k, v = data[0][1][2:3] * 1e6, data[0][2][2:3] * 1e6                 # beyond fp16: clamped to +-65504
    regions = torch.zeros_like(regions)
    want = regions.clone()
    mass = torch.full((1, HKV, 3), 0.25)
    tdec.maintain_hi_decode(want, lay, cfg, table[:1], pos, k, v, mass)
    maintain_hi_decode(regions, lay, cfg, table[:1], pos, k, v, mass[:, :, 2])
    assert torch.equal(regions, want) and (lay.views(want).k_hi.float().abs() == 65504).any()


def test_fp8_hi_cast_matches_torch():
    """The kernel's fp32 -> float8_e4m3fn conversion = torch's cast bit for bit: every fp8 value,
    the midpoints between neighbours (ties to even), carries into the exponent, -0.0 and NaN."""
    @triton.jit   # defined here: TRITON_INTERPRET is set around each test (conftest)
    def _fp8_cast(x_ptr, y_ptr, n: tl.constexpr):
        o = tl.arange(0, n)
        tl.store(y_ptr + o, _fp8e4m3_rtne(tl.load(x_ptr + o)))

    every = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    finite = every[torch.isfinite(every)].unique()
    x = torch.cat([finite, (finite[1:] + finite[:-1]) / 2, torch.tensor([-0.0, float("nan"), -float("nan"), 1.97]),
                   (torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 40).clamp(-448, 448)])
    x = torch.cat([x, torch.zeros(8192 - x.numel())])
    y = torch.empty(x.numel(), dtype=torch.float8_e4m3fn)
    _fp8_cast[(1,)](x, y, x.numel())
    assert torch.equal(y.view(torch.uint8), x.to(torch.float8_e4m3fn).view(torch.uint8))
