"""Reference page operations: the composed per-request step and its edge cases."""

import math

import pytest
import torch

from mikv_vllm.config import MiKVConfig, preset
from mikv_vllm.core.balancer import compute_balancer, from_storage, to_storage, unbalance_keys
from mikv_vllm.core.importance import hi_budget
from mikv_vllm.core.quant import dequantize_codes, fake_quantize, quantize_codes, to_hi
from mikv_vllm.core.layout import RegionLayout
from mikv_vllm.core.reference import (attention, first_voting_row, forward_request, gather_context,
                                      load_balancer, write_tokens)

from ._helpers import dense_attention, make_regions, run_request, structured_qkv

HQ, HKV, D, N = 6, 2, 32, 16
SCALE = 1 / math.sqrt(D)


def _layout(cfg, n=N, d=D):
    return RegionLayout.build(cfg, n, d)


def _tags(regions, layout, row, length):
    """{head: sorted tagged positions} over the request's blocks."""
    v = layout.views(regions)
    nb = -(-length // layout.block_size)
    tags = v.tag[row[:nb].long()].transpose(0, 1).reshape(regions.shape[1], -1)
    return [sorted((t[t > 0] - 1).tolist()) for t in tags]


MIKV_FP32_ALL_HI = MiKVConfig(policy="mikv", lo_bits=2, hi_ratio=1.0, hi_dtype="float32")


@pytest.mark.parametrize("garbage", [False, True])
def test_all_hi_fp32_equals_dense_attention(garbage):
    cfg, lay = MIKV_FP32_ALL_HI, _layout(MIKV_FP32_ALL_HI)
    chunks = [20, 17, 13, 1, 1, 1, 1, 1]                      # chunked prefill + 5 decode steps
    length = sum(chunks)
    q, k, v = structured_qkv(length, HQ, HKV, D, seed=3)
    regions = make_regions(lay, 12, HKV, garbage=garbage)
    row = torch.tensor([9, 2, 7, 4, 11, 0])                    # longer than needed (4 blocks)
    out = run_request(regions, lay, cfg, row, q, k, v, chunks, SCALE)
    ref = dense_attention(q, k, v, SCALE)
    assert (out - ref).abs().max().item() < 1e-5
    assert all(t == list(range(length)) for t in _tags(regions, lay, row, length))


def _decode_error(cfg, length=96, decode=24, seed=0, n=N, d=D, hq=HQ, hkv=HKV):
    """Relative error of the decode rows only (prefill rows attend raw in-chunk K/V)."""
    lay = RegionLayout.build(cfg, n, d)
    q, k, v = structured_qkv(length + decode, hq, hkv, d, seed=seed)
    blocks = -(-(length + decode) // n) + 1
    regions = make_regions(lay, blocks, hkv, garbage=True)
    row = torch.randperm(blocks, generator=torch.Generator().manual_seed(seed))
    out = run_request(regions, lay, cfg, row, q, k, v, [length] + [1] * decode, 1 / math.sqrt(d))
    ref = dense_attention(q, k, v, 1 / math.sqrt(d))
    return ((out[length:] - ref[length:]).norm() / ref[length:].norm()).item()


def test_rtn_error_grows_as_bits_fall():
    errs = {b: _decode_error(MiKVConfig(policy="rtn", lo_bits=b, hi_ratio=0.0, sink_tokens=0, recent_window=0,
                                        balancer=False)) for b in (8, 4, 3, 2)}
    assert errs[8] < 1e-2
    assert errs[8] < errs[4] < errs[3] < errs[2]


@pytest.mark.parametrize("seed", [0, 1])
def test_hi_tier_and_balancer_each_cut_the_decode_error(seed):
    """One component at a time, everything else equal (INT2, groups of D/2)."""
    mikv = _decode_error(MiKVConfig(policy="mikv", lo_bits=2, hi_ratio=0.2), seed=seed)
    no_hi = _decode_error(MiKVConfig(policy="rtn", lo_bits=2, hi_ratio=0.0, balancer=True), seed=seed)
    no_bal = _decode_error(MiKVConfig(policy="mikv", lo_bits=2, hi_ratio=0.2, balancer=False), seed=seed)
    assert mikv < 0.7 * no_hi, (mikv, no_hi)        # measured 0.23-0.25 vs 0.41-0.44
    assert mikv < 0.85 * no_bal, (mikv, no_bal)     # measured 0.23-0.25 vs 0.34-0.36


def test_h2o_untagged_tokens_get_exactly_zero_weight():
    cfg = preset("h2o")
    lay = _layout(cfg)
    length = 80
    q, k, v = structured_qkv(length + 1, HQ, HKV, D, seed=5)
    regions = make_regions(lay, 8, HKV, garbage=True)
    row = torch.tensor([3, 6, 1, 0, 5, 7])
    run_request(regions, lay, cfg, row, q, k, v, [50, 30], SCALE)
    kept = _tags(regions, lay, row, length)
    assert all(len(t) == hi_budget(cfg, length, 5 * lay.hi_slots) == 16 for t in kept)
    # next decode step: weights via the reference ops
    write_tokens(regions, lay, row, length, k[length:], v[length:])
    k_ctx, v_ctx, valid = gather_context(regions, lay, row, length)
    out, mass = attention(q[length:], k_ctx, v_ctx, valid, k[length:], v[length:], SCALE, vote_from=0)
    for h in range(HKV):
        assert valid[h].nonzero().flatten().tolist() == kept[h]
        assert (mass[h, :length][~valid[h]] == 0).all()
        assert (mass[h, :length][valid[h]] > 0).all()
    # and the output equals dense attention over the kept tokens (fp16 hi copies) + the current token
    for h in range(HKV):
        idx = torch.tensor(kept[h] + [length])
        kh = k[idx, h:h + 1].clone()
        vh = v[idx, h:h + 1].clone()
        kh[:-1], vh[:-1] = kh[:-1].half().float(), vh[:-1].half().float()
        g = HQ // HKV
        ref = dense_attention(q[length:, h * g:(h + 1) * g], kh, vh, SCALE, offset=len(kept[h]))
        assert (out[:, h * g:(h + 1) * g] - ref).abs().max().item() < 1e-5


def _needle_qkv(length, needle, seed=0):
    gen = torch.Generator().manual_seed(seed)
    d = 64
    u = torch.randn(d, generator=gen)
    u = u / u.norm()
    k = torch.randn(length, 2, d, generator=gen)
    v = torch.randn(length, 2, d, generator=gen)
    q = torch.randn(length, 4, d, generator=gen) + 3.0 * u
    k[needle] = 12.0 * u + 0.3 * torch.randn(2, d, generator=gen)
    v[needle] = 4.0 * torch.randn(2, d, generator=gen)
    return q, k, v


def test_planted_needle_stays_hi_under_mikv_not_rtn():
    length, needle, d = 128, 60, 64
    q, k, v = _needle_qkv(length, needle)
    scale = 1 / math.sqrt(d)
    errs = {}
    for name in ("mikv-paper", "rtn"):
        cfg = preset(name)
        lay = RegionLayout.build(cfg, N, d)
        regions = make_regions(lay, 10, 2)
        row = torch.arange(9, -1, -1)
        run_request(regions, lay, cfg, row, q, k, v, [40, 40, 48], scale)
        b = load_balancer(regions, lay, row)
        kc, vc, _ = gather_context(regions, lay, row, length, b)
        errs[name] = ((kc[:, needle] - k[needle]).norm()
                      + (vc[:, needle] - v[needle]).norm()).item()
        if name == "mikv-paper":
            assert all(needle in t for t in _tags(regions, lay, row, length))
    assert errs["mikv-paper"] < 0.01 * errs["rtn"]


# "heavy": with 1 sink and r = 0.3 heavy hitters hold slots from ~10 tokens on, so stale scores of a
# reused block would change which tokens are hi (the default presets' sinks + recent window fill the
# whole budget of this short request).
STALE_CONFIGS = {name: preset(name) for name in ("mikv", "mikv-paper", "h2o", "rtn")}
STALE_CONFIGS["heavy"] = MiKVConfig(policy="mikv", lo_bits=2, hi_ratio=0.3, sink_tokens=1)


@pytest.mark.parametrize("name", list(STALE_CONFIGS))
def test_stale_block_reuse_does_not_leak(name):
    cfg = STALE_CONFIGS[name]
    lay = _layout(cfg)
    qa, ka, va = structured_qkv(70, HQ, HKV, D, seed=11)
    qb, kb, vb = structured_qkv(45, HQ, HKV, D, seed=12)
    reused = make_regions(lay, 8, HKV, garbage=True)
    run_request(reused, lay, cfg, torch.tensor([5, 2, 7, 0, 3]), qa, ka * 5, va, [64, 1, 1, 1, 1, 1, 1], SCALE)
    row_b = torch.tensor([2, 7, 5])
    out_reused = run_request(reused, lay, cfg, row_b, qb, kb, vb, [30, 10, 1, 1, 1, 1, 1], SCALE)
    fresh = make_regions(lay, 8, HKV)
    out_fresh = run_request(fresh, lay, cfg, row_b, qb, kb, vb, [30, 10, 1, 1, 1, 1, 1], SCALE)
    assert torch.equal(out_reused, out_fresh)
    assert _tags(reused, lay, row_b, 45) == _tags(fresh, lay, row_b, 45)


def test_rtn_has_no_hi_state_and_untouched_blocks_stay_untouched():
    cfg = preset("rtn")
    lay = _layout(cfg)
    views = lay.views(make_regions(lay, 2, HKV))
    assert lay.hi_slots == 0
    assert views.tag.shape[-1] == 0 and views.score.shape[-1] == 0 and views.k_hi.numel() == 0
    regions = make_regions(lay, 6, HKV, garbage=True)
    before = regions.clone()
    q, k, v = structured_qkv(20, HQ, HKV, D)
    run_request(regions, lay, cfg, torch.tensor([4, 1, 0, 3]), q, k, v, [17, 1, 1, 1], SCALE)
    for blk in (2, 5, 0, 3):   # blocks beyond ceil(20 / 16) = 2 entries of the row, or not in it
        assert torch.equal(regions[blk], before[blk])


def test_hi_set_invariants_over_decode():
    cfg = MiKVConfig(policy="mikv", lo_bits=3, hi_ratio=0.2, sink_tokens=2)
    lay = _layout(cfg)
    total = 90
    q, k, v = structured_qkv(total, HQ, HKV, D, seed=4)
    regions = make_regions(lay, 8, HKV, garbage=True)
    row = torch.tensor([1, 3, 5, 7, 0, 2])
    chunks = [33, 20] + [1] * (total - 53)
    start, prev = 0, None
    for size in chunks:
        forward_request(regions, lay, cfg, row, start, q[start:start + size], k[start:start + size],
                        v[start:start + size], SCALE)
        start += size
        tags = _tags(regions, lay, row, start)
        nb = -(-start // N)
        for h, t in enumerate(tags):
            assert len(t) == len(set(t)) == min(max(int(0.2 * start + 1e-9), 2), nb * lay.hi_slots)
            assert all(0 <= p < start for p in t)
            if prev is not None:   # one-way: only previously-hi or brand-new tokens
                assert set(t) <= set(prev[h]) | set(range(start - size, start))
            assert {0, 1} <= set(t) and start - 1 in t       # sinks and newest token
        prev = tags
    # tagged tokens read back their fp16 raw K/V, others their dequantized lo copy
    b = load_balancer(regions, lay, row)
    kc, vc, valid = gather_context(regions, lay, row, total, b)
    assert valid.all()
    for h, t in enumerate(prev):
        idx = torch.tensor(t)
        assert torch.equal(kc[h, idx], k[idx, h].half().float())
        assert torch.equal(vc[h, idx], v[idx, h].half().float())


def test_window_scorer_votes_only_last_rows():
    cfg = MiKVConfig(policy="mikv", scorer="window", obs_window=4)
    assert first_voting_row(cfg, 10) == 6 and first_voting_row(cfg, 3) == 0 and first_voting_row(cfg, 1) == 0
    assert first_voting_row(MiKVConfig(policy="mikv"), 10) == 0
    q, k, v = structured_qkv(10, HQ, HKV, D)
    empty = torch.zeros(HKV, 0, D)
    _, full = attention(q, empty, empty, torch.zeros(HKV, 0, dtype=torch.bool), k, v, SCALE, vote_from=0)
    _, last = attention(q, empty, empty, torch.zeros(HKV, 0, dtype=torch.bool), k, v, SCALE, vote_from=6)
    g = HQ // HKV
    assert torch.allclose(full.sum(1), torch.full((HKV,), 10.0 * g))
    assert torch.allclose(last.sum(1), torch.full((HKV,), 4.0 * g))
    assert torch.allclose(last[:, 7:], full[:, 7:])          # only rows >= 6 see keys >= 7 anyway
    assert (last[:, :6] < full[:, :6]).all()


def test_attention_chunks_query_rows(monkeypatch):
    import mikv_vllm.core.reference as ref
    q, k, v = structured_qkv(40, HQ, HKV, D, seed=9)
    kc, vc = k[:25].transpose(0, 1), v[:25].transpose(0, 1)
    valid = torch.rand(HKV, 25, generator=torch.Generator().manual_seed(0)) > 0.3
    o1, m1 = attention(q[25:], kc, vc, valid, k[25:], v[25:], SCALE, vote_from=3)
    monkeypatch.setattr(ref, "MAX_LOGIT_ELEMENTS", 50)
    o2, m2 = attention(q[25:], kc, vc, valid, k[25:], v[25:], SCALE, vote_from=3)
    assert torch.allclose(o1, o2, atol=1e-6) and torch.allclose(m1, m2, atol=1e-6)


@pytest.mark.parametrize("hi_dtype", ["float16", "bfloat16", "float32", "float8_e4m3fn"])
def test_hi_dtypes_at_block_128(hi_dtype):
    """Every hi dtype halves the decode error of the same page without a hi tier (block 128): INT4
    lo copies; INT2 for fp8 hi copies (3 mantissa bits are about as coarse as INT4 groups of 32)."""
    shape = dict(length=130, decode=20, n=128, d=64, hq=4, hkv=2, seed=2)
    bits = 2 if hi_dtype == "float8_e4m3fn" else 4
    mikv = _decode_error(MiKVConfig(policy="mikv", lo_bits=bits, hi_ratio=0.3, hi_dtype=hi_dtype), **shape)
    no_hi = _decode_error(MiKVConfig(policy="rtn", lo_bits=bits, hi_ratio=0.0, balancer=True), **shape)
    assert mikv < 0.6 * no_hi, (mikv, no_hi)         # measured 0.070 vs 0.131


@pytest.mark.parametrize("hi_dtype", ["float16", "bfloat16", "float8_e4m3fn"])
def test_hi_copies_are_clamped_to_the_hi_dtype(hi_dtype):
    """A bf16/fp32 model's K/V beyond fp16's range: the hi copy saturates, nothing turns inf/NaN."""
    cfg = MiKVConfig(policy="mikv", lo_bits=4, hi_ratio=1.0, hi_dtype=hi_dtype)
    lay = _layout(cfg)
    q, k, v = structured_qkv(20, HQ, HKV, D, seed=6)
    k[3, 0, 5], v[7, 1, 2], v[8, 0, 0] = 1e6, -3e5, 7e4
    regions = make_regions(lay, 3, HKV, garbage=True)
    row = torch.tensor([2, 0])
    out = run_request(regions, lay, cfg, row, q, k, v, [12, 1, 1, 6], SCALE)
    assert torch.isfinite(out).all()
    kc, vc, _ = gather_context(regions, lay, row, 20, load_balancer(regions, lay, row))
    dt = getattr(torch, hi_dtype)
    top = torch.finfo(dt).max
    expect = [torch.tensor(x).clamp(-top, top).to(dt).float() for x in (1e6, -3e5, 7e4)]
    assert [kc[0, 3, 5], vc[1, 7, 2], vc[0, 8, 0]] == expect
    if hi_dtype == "float16":
        assert expect == [65504.0, -65504.0, 65504.0]
    if hi_dtype == "float8_e4m3fn":
        assert expect == [448.0, -448.0, 448.0]


@pytest.mark.parametrize("name", ["mikv", "mikv-int4-r03", "mikv-paper", "h2o", "rtn"])
def test_one_token_prompt_then_decode(name):
    cfg = preset(name)
    lay = _layout(cfg)
    q, k, v = structured_qkv(6, HQ, HKV, D, seed=8)
    regions = make_regions(lay, 2, HKV, garbage=True)
    out = run_request(regions, lay, cfg, torch.tensor([1]), q, k, v, [1] * 6, SCALE)
    assert torch.isfinite(out).all()
    # the first token attends only to itself, exactly
    assert torch.allclose(out[0], v[0].repeat_interleave(HQ // HKV, 0), atol=1e-6)
    # the last step, rebuilt by hand: the sinks hi (the hi dtype) as far as the block's slots go (mikv:
    # R = 1 at N = 16, the others 4), other cached tokens lo (balancer from token 0 alone) or evicted
    # (h2o), token 5 raw (the new token)
    b = from_storage(to_storage(compute_balancer(q[:1], k[:1]))) if lay.has_balancer else torch.ones(HKV, D)
    g = cfg.group_for(D)

    def fq(x, bits):   # keys and values at their own widths; fp8-scale: the scale rounded up to e5m2
        return dequantize_codes(*quantize_codes(x, bits, g, scale_fp8=cfg.group_meta == "fp8-scale"), g)
    lo_k = unbalance_keys(fq(k * b, cfg.k_bits), b) if cfg.has_lo else None
    lo_v = fq(v, cfg.v_bits) if cfg.has_lo else None
    hi = min(4, lay.hi_slots)
    keep = list(range(5 if cfg.has_lo else hi)) + [5]
    kk = torch.stack([to_hi(k[i], lay.hi_dtype).float() if i < hi else (lo_k[i] if i < 5 else k[i]) for i in keep])
    vv = torch.stack([to_hi(v[i], lay.hi_dtype).float() if i < hi else (lo_v[i] if i < 5 else v[i]) for i in keep])
    expect = dense_attention(q[5:6], kk, vv, SCALE, offset=len(keep) - 1)
    assert (out[5:6] - expect).abs().max().item() < 1e-5
    if name == "h2o":
        # floor(0.2 * L) <= 1 up to L = 9, but the 4 sinks are granted from the first step; tokens 4, 5
        # were evicted on arrival (budget 4 = the sinks)
        assert hi == 4
        assert _tags(regions, lay, torch.tensor([1]), 6) == [[0, 1, 2, 3], [0, 1, 2, 3]]
