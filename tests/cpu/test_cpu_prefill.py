"""The fused C++ prefill step (all multi-token chunks of a step in one call) vs the torch reference
(the oracle: ``forward_request`` per chunk), on garbage-filled pages, then decode steps on both."""

import math

import pytest
import torch

from mikv_vllm.config import MiKVConfig, preset
from mikv_vllm.core import reference as ref
from mikv_vllm.ops import torch_decode as tdec
from mikv_vllm.core.layout import RegionLayout
from mikv_vllm.cpu import CpuOps

from core._helpers import assert_pages, make_regions, structured_qkv

N = 16
HKV = 2
DECODE_STEPS = 3
# (context already cached, chunk length T): ctx 0 and > 0, T from 2 to > N, block boundaries
CHUNKS = [(0, 2), (0, 37), (21, 5), (32, 16), (7, 40), (0, 16), (50, 3)]

CONFIGS = {
    "mikv": (preset("mikv"), 3, 64),
    "mikv-window": (MiKVConfig(policy="mikv", lo_bits=3, hi_ratio=0.2, scorer="window", obs_window=6), 3, 64),
    "mikv-paper-gqa1": (preset("mikv-paper"), 1, 32),
    "few-slots": (MiKVConfig(policy="mikv", lo_bits=4, hi_ratio=0.05, sink_tokens=2), 2, 64),
    "int8-bf16-hi-nobal-g8": (MiKVConfig(policy="mikv", lo_bits=8, hi_ratio=0.2, hi_dtype="bfloat16",
                                         balancer=False, group_size=8, recent_window=3), 3, 32),
    "int4-fp32-hi": (MiKVConfig(policy="mikv", lo_bits=4, hi_ratio=0.25, hi_dtype="float32"), 2, 64),
    "lossless-r1": (MiKVConfig(policy="mikv", lo_bits=3, hi_ratio=1.0, group_size=16), 4, 64),
    "rtn": (preset("rtn"), 3, 64),
    "h2o": (preset("h2o"), 3, 64),
    "h2o-window": (MiKVConfig(policy="h2o", lo_bits=0, hi_ratio=0.3, scorer="window", obs_window=4), 3, 64),
    # keys and values at their own widths, fp8-scale metadata
    "int4-r03": (preset("mikv-int4-r03"), 3, 64),          # INT4 values, fp16 group metadata
    "k2v8-g16": (MiKVConfig(policy="mikv", k_bits=2, v_bits=8, hi_ratio=0.2, group_size=16), 2, 64),
    "k8v3-fp8-scale-g8-nobal": (MiKVConfig(policy="mikv", k_bits=8, v_bits=3, hi_ratio=0.2, group_size=8,
                                           balancer=False, group_meta="fp8-scale"), 1, 32),
    "rtn-k3v4-fp8-scale": (preset("rtn").replace(k_bits=3, v_bits=4, group_meta="fp8-scale"), 3, 64),
}


def _setup(cfg, group, d, seed=0):
    """Pages with every request's context cached by the reference; block rows over shuffled blocks."""
    lay = RegionLayout.build(cfg, N, d)
    num_blocks = 48
    regions = make_regions(lay, num_blocks, HKV, garbage=True, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_blocks, generator=gen)
    rows, used, width = [], 0, 8
    for ctx, t in CHUNKS:
        nb = -(-(ctx + t + DECODE_STEPS) // N)
        own = perm[used:used + nb]
        used += nb
        pad = perm[torch.randint(0, num_blocks, (width - nb,), generator=gen)]   # foreign blocks: never touched
        rows.append(torch.cat([own, pad]))
    table = torch.stack(rows).int()
    scale = 1 / math.sqrt(d)
    qkv = [structured_qkv(ctx + t + DECODE_STEPS, group * HKV, HKV, d, seed=seed + i)
           for i, (ctx, t) in enumerate(CHUNKS)]
    for i, (ctx, t) in enumerate(CHUNKS):
        q, k, v = qkv[i]
        for c0 in range(0, ctx, 13):   # chunked, as an engine would
            c1 = min(ctx, c0 + 13)
            ref.forward_request(regions, lay, cfg, table[i], c0, q[c0:c1], k[c0:c1], v[c0:c1], scale)
        if lay.hi_slots:   # blocks the chunk starts hold stale small tags (a reused block): must be reset
            for j in range(-(-ctx // N), -(-(ctx + t) // N)):
                lay.views(regions).tag[table[i, j].long()] = torch.arange(1, lay.hi_slots + 1, dtype=torch.int32)
    return lay, regions, table, qkv, perm[used:], scale


def _step_rows(qkv):
    """One step's q/k/v: the chunks in order, with one foreign row (a decode row) between chunks 1 and 2."""
    parts, rows, at = [], [], 0
    for i, (ctx, t) in enumerate(CHUNKS):
        if i == 2:
            parts.append(tuple(torch.randn(1, *x.shape[1:]) for x in qkv[i]))
            at += 1
        parts.append(tuple(x[ctx:ctx + t] for x in qkv[i]))
        rows.append((at, at + t))
        at += t
    q, k, v = (torch.cat([p[j] for p in parts]) for j in range(3))
    return q, k, v, torch.tensor(rows, dtype=torch.int64)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_chunks_then_decode_match_reference(name):
    cfg, group, d = CONFIGS[name]
    lay, regions, table, qkv, unused, scale = _setup(cfg, group, d)
    mine, oracle = regions.clone(), regions.clone()
    q, k, v, rows = _step_rows(qkv)
    ctx = torch.tensor([c for c, _ in CHUNKS])
    want = ref.forward_chunks(oracle, lay, cfg, table, ctx, rows, q, k, v, scale)
    got = CpuOps.forward_chunks(mine, lay, cfg, table, ctx, rows, q, k, v, scale)
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert not got[rows[1, 1]].any()                       # the foreign row is left alone (0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(lay.views(mine).tag, lay.views(oracle).tag)   # same hi sets and slots
    assert_pages(lay, mine, oracle, "after prefill")
    for step in range(DECODE_STEPS):   # the page state continues: decode steps on both
        pos = [c + t + step for c, t in CHUNKS]
        qd, kd, vd = (torch.stack([qkv[i][j][p] for i, p in enumerate(pos)]) for j in range(3))
        want = tdec.forward_decode(oracle, lay, cfg, table, pos, qd, kd, vd, scale)
        got = CpuOps.forward_decode(mine, lay, cfg, table, pos, qd, kd, vd, scale)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert_pages(lay, mine, oracle, f"decode step {step}")
    assert torch.equal(mine[unused], regions[unused])


@pytest.mark.parametrize("name", ["mikv", "h2o"])
def test_forward_request_chunked_prompt_matches_reference(name):
    """A whole 2-block+ prompt in chunks through ``CpuOps.forward_request`` (the C++ op, one chunk a call)."""
    cfg, group, d = CONFIGS[name]
    lay = RegionLayout.build(cfg, N, d)
    regions = make_regions(lay, 12, HKV, garbage=True, seed=3)
    row = torch.tensor([5, 2, 9, 0, 7, 11], dtype=torch.int32)
    q, k, v = structured_qkv(90, group * HKV, HKV, d, seed=3)
    mine, oracle = regions.clone(), regions.clone()
    for c0, c1 in [(0, 40), (40, 41), (41, 77), (77, 90)]:
        want = ref.forward_request(oracle, lay, cfg, row, c0, q[c0:c1], k[c0:c1], v[c0:c1], 0.125)
        got = CpuOps.forward_request(mine, lay, cfg, row, c0, q[c0:c1], k[c0:c1], v[c0:c1], 0.125)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert_pages(lay, mine, oracle, f"chunk {c0}")


def test_bad_chunk_inputs_raise():
    cfg, group, d = CONFIGS["mikv"]
    lay, regions, table, qkv, _, scale = _setup(cfg, group, d)
    q, k, v, rows = _step_rows(qkv)
    ctx = torch.tensor([c for c, _ in CHUNKS])
    bad = table.clone()
    bad[1, 2] = regions.shape[0]
    with pytest.raises(RuntimeError, match="out of range"):
        CpuOps.forward_chunks(regions, lay, cfg, bad, ctx, rows, q, k, v, scale)
    far = rows.clone()
    far[-1, 1] = q.shape[0] + 1
    with pytest.raises(RuntimeError, match="outside"):
        CpuOps.forward_chunks(regions, lay, cfg, table, ctx, far, q, k, v, scale)


def test_values_beyond_fp16_are_clamped_like_the_reference():
    """K/V above fp16's range (a bf16/fp32 model): hi copies clamped to +-65504, same bytes as the oracle."""
    cfg = MiKVConfig(policy="mikv", lo_bits=4, hi_ratio=0.5)
    lay = RegionLayout.build(cfg, N, 64)
    regions = make_regions(lay, 4, HKV, garbage=True, seed=5)   # blocks 2, 0 hold 32 positions
    q, k, v = structured_qkv(24, 2 * HKV, HKV, 64, seed=5)
    k[:, :, :4] *= 1e5
    v[:, :, 5:9] *= -1e5
    row, rows, ctx = torch.tensor([[2, 0]], dtype=torch.int32), torch.tensor([[0, 24]]), torch.tensor([0])
    mine, oracle = regions.clone(), regions.clone()
    want = ref.forward_chunks(oracle, lay, cfg, row, ctx, rows, q, k * 1e-3, v * 1e-3, 0.125)
    got = CpuOps.forward_chunks(mine, lay, cfg, row, ctx, rows, q, k * 1e-3, v * 1e-3, 0.125)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)   # logits ~1e2: fp32 order effects
    want = ref.forward_chunks(oracle, lay, cfg, row, ctx + 24, torch.tensor([[0, 8]]), q[:8], k[:8], v[:8], 0.125)
    got = CpuOps.forward_chunks(mine, lay, cfg, row, ctx + 24, torch.tensor([[0, 8]]), q[:8], k[:8], v[:8], 0.125)
    views = lay.views(mine)
    held = views.tag[[2, 0]] > 0                                   # the request's filled hi slots
    k_hi, v_hi = views.k_hi[[2, 0]][held].float(), views.v_hi[[2, 0]][held].float()
    assert k_hi.abs().max() == 65504 and v_hi.abs().max() == 65504 and torch.isfinite(v_hi).all()
    assert_pages(lay, mine, oracle, "huge values")


@pytest.mark.parametrize("name", ["mikv", "lossless-r1", "few-slots", "int4-fp32-hi", "int4-r03"])
def test_prefill_reading_shared_prefix_blocks_matches_reference(name):
    """A prefix-cache hit: request 1's chunk starts after 2 blocks it shares with request 0 (own_from 2),
    in the same call as request 0's next chunk; then decode steps. The C++ op equals the reference,
    and request 1 writes nothing in the shared blocks."""
    cfg, group, d = CONFIGS[name]
    lay = RegionLayout.build(cfg, N, d)
    regions = make_regions(lay, 16, HKV, garbage=True, seed=5)
    table = torch.tensor([[3, 8, 1, 12, 6, 0], [3, 8, 10, 4, 14, 2]], dtype=torch.int32)   # blocks 3, 8 shared
    q0, k0, v0 = structured_qkv(80, group * HKV, HKV, d, seed=5)
    q1, k1, v1 = structured_qkv(80, group * HKV, HKV, d, seed=6)
    q1[:2 * N], k1[:2 * N], v1[:2 * N] = q0[:2 * N], k0[:2 * N], v0[:2 * N]   # the same prefix tokens
    scale = 1 / math.sqrt(d)
    ref.forward_request(regions, lay, cfg, table[0], 0, q0[:40], k0[:40], v0[:40], scale)   # request 0 fills them
    if name == "int4-fp32-hi":   # the writer holds hi copies of prefix tokens past the sinks (unstable: unread)
        tags = lay.views(regions).tag[table[0, :3].long()]
        assert ((tags > cfg.sink_tokens) & (tags <= 2 * N)).any()
    mine, oracle = regions.clone(), regions.clone()
    shared = table[1, :2].long()
    q = torch.cat([q0[40:50], q1[32:45]])
    k = torch.cat([k0[40:50], k1[32:45]])
    v = torch.cat([v0[40:50], v1[32:45]])
    rows, ctx, own = torch.tensor([[0, 10], [10, 23]]), torch.tensor([40, 32]), torch.tensor([0, 2])
    want = ref.forward_chunks(oracle, lay, cfg, table, ctx, rows, q, k, v, scale, own)
    reader_only = mine.clone()   # request 1 alone must leave the shared blocks as they are
    CpuOps.forward_chunks(reader_only, lay, cfg, table[1:], ctx[1:], torch.tensor([[0, 13]]), q[10:], k[10:], v[10:],
                          scale, own[1:])
    assert torch.equal(reader_only[shared], mine[shared])
    got = CpuOps.forward_chunks(mine, lay, cfg, table, ctx, rows, q, k, v, scale, own)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert_pages(lay, mine, oracle, "after prefill")
    plain = regions.clone()   # the check can fail: as an owner (own_from 0), request 1 writes scores there
    CpuOps.forward_chunks(plain, lay, cfg, table[1:], ctx[1:], torch.tensor([[0, 13]]), q[10:], k[10:], v[10:], scale)
    assert not torch.equal(plain[shared], regions[shared])
    for step in range(3):
        pos = [50 + step, 45 + step]
        qd, kd, vd = (torch.stack([x0[pos[0]], x1[pos[1]]]) for x0, x1 in ((q0, q1), (k0, k1), (v0, v1)))
        want = tdec.forward_decode(oracle, lay, cfg, table, pos, qd, kd, vd, scale, own)
        got = CpuOps.forward_decode(mine, lay, cfg, table, pos, qd, kd, vd, scale, own)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert_pages(lay, mine, oracle, f"decode step {step}")
