"""The fused C++ CPU decode step vs the torch reference (the oracle), on garbage-filled pages."""

import math

import pytest
import torch

from mikv_vllm.config import MiKVConfig, preset
from mikv_vllm.core import reference as ref
from mikv_vllm.core.layout import RegionLayout
from mikv_vllm.cpu import CpuOps, decode_step, load

from core._helpers import make_regions, structured_qkv

N = 16
STEPS = 5
PROMPTS = [37, 0, 16, 5, 1, 70]      # multi-block, first token (context 0), block boundary, short

CONFIGS = {
    "mikv": (preset("mikv"), 3, 64),
    "mikv-paper-gqa1": (preset("mikv-paper"), 1, 32),
    "int4-fp32-hi": (MiKVConfig(policy="mikv", lo_bits=4, hi_ratio=0.25, hi_dtype="float32"), 2, 64),
    "int8-bf16-hi-nobal-g8": (MiKVConfig(policy="mikv", lo_bits=8, hi_ratio=0.2, hi_dtype="bfloat16",
                                         balancer=False, group_size=8), 3, 32),
    "int3-group16-all-hi": (MiKVConfig(policy="mikv", lo_bits=3, hi_ratio=1.0, group_size=16), 4, 64),
    "h2o": (preset("h2o"), 3, 64),
    "rtn": (preset("rtn"), 3, 64),
    "int3-fp8-hi-g64": (MiKVConfig(policy="mikv", lo_bits=3, hi_ratio=0.3, group_size=64,
                                   hi_dtype="float8_e4m3fn"), 3, 64),
    "rtn-int4-g64": (preset("rtn-int4").replace(group_size=64), 2, 64),
    "h2o-fp8-hi": (preset("h2o").replace(hi_dtype="float8_e4m3fn"), 2, 64),
}
HKV = 2


def _setup(cfg, group, d, seed=0):
    lay = RegionLayout.build(cfg, N, d)
    num_blocks = 40
    regions = make_regions(lay, num_blocks, HKV, garbage=True, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_blocks, generator=gen)
    rows, used, width = [], 0, 8
    for p in PROMPTS:
        nb = -(-(p + STEPS) // N)
        own = perm[used:used + nb]
        used += nb
        pad = perm[torch.randint(0, num_blocks, (width - nb,), generator=gen)]   # foreign blocks: never touched
        rows.append(torch.cat([own, pad]))
    table = torch.stack(rows).int()
    qkv = [structured_qkv(p + STEPS, group * HKV, HKV, d, seed=seed + i) for i, p in enumerate(PROMPTS)]
    for i, p in enumerate(PROMPTS):
        if p:
            q, k, v = qkv[i]
            ref.forward_request(regions, lay, cfg, table[i], 0, q[:p], k[:p], v[:p], 1 / math.sqrt(d))
    return lay, regions, table, qkv, perm[used:]


def _step(qkv, pos):
    return tuple(torch.stack([qkv[i][j][c] for i, c in enumerate(pos)]) for j in range(3))


def _reference_step(regions, lay, table, pos, q, k, v, scale):
    """The reference decode step without hi maintenance (what the C++ op fuses)."""
    b = ref.decode_balancer(regions, lay, table, pos, q, k)
    blk = table.long().gather(1, (pos // lay.block_size)[:, None])[:, 0]
    ref.store_at(regions, lay, blk, pos % lay.block_size, k, v, b)
    k_ctx, v_ctx, valid = ref.gather_decode(regions, lay, table, pos, b)
    out, mass = ref.attention_decode(q, k_ctx, v_ctx, valid, pos, k, v, scale)
    ref.accumulate_scores_decode(regions, lay, table, pos, mass)
    return out


def _assert_pages(lay, got, want):
    gv, wv = lay.views(got), lay.views(want)
    torch.testing.assert_close(gv.score.float(), wv.score.float(), rtol=1e-5, atol=1e-6, equal_nan=True)
    same = got.clone()
    lay.views(same).score.copy_(wv.score)
    diff = (same != want).nonzero()
    assert diff.numel() == 0, f"{diff.shape[0]} bytes differ, first at {diff[:3].tolist()}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_step_matches_reference(name):
    cfg, group, d = CONFIGS[name]
    lay, regions, table, qkv, unused = _setup(cfg, group, d)
    scale = 1 / math.sqrt(d)
    mine, oracle = regions.clone(), regions.clone()
    pos = torch.tensor(PROMPTS)
    q, k, v = _step(qkv, PROMPTS)
    want = _reference_step(oracle, lay, table, pos, q, k, v, scale)
    got = decode_step(mine, lay, table, pos, q, k, v, scale)
    assert got.shape == want.shape and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    _assert_pages(lay, mine, oracle)
    assert torch.equal(mine[unused], regions[unused])


@pytest.mark.parametrize("name", ["mikv", "int4-fp32-hi", "h2o", "int3-group16-all-hi", "int3-fp8-hi-g64"])
def test_forward_decode_steps_match_reference(name):
    cfg, group, d = CONFIGS[name]
    lay, regions, table, qkv, unused = _setup(cfg, group, d, seed=1)
    scale = 1 / math.sqrt(d)
    mine, oracle = regions.clone(), regions.clone()
    for step in range(STEPS):
        pos = [p + step for p in PROMPTS]
        q, k, v = _step(qkv, pos)
        want = ref.forward_decode(oracle, lay, cfg, table, pos, q, k, v, scale)
        got = CpuOps.forward_decode(mine, lay, cfg, table, pos, q, k, v, scale)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(lay.views(mine).tag, lay.views(oracle).tag), step    # same hi sets and slots
        _assert_pages(lay, mine, oracle)
    assert torch.equal(mine[unused], regions[unused])


@pytest.mark.parametrize("name", ["mikv", "int4-fp32-hi", "int3-group16-all-hi"])
def test_shared_rows_match_reference(name):
    """Rows reading shared prefix blocks (own_from > 0): request 0 reads request 5's first two
    blocks (as after a prefix-cache hit) while request 5 keeps writing them."""
    cfg, group, d = CONFIGS[name]
    lay, regions, table, qkv, unused = _setup(cfg, group, d, seed=2)
    table[0, :2] = table[5, :2]
    own_from = [2, 0, 0, 0, 0, 0]
    scale = 1 / math.sqrt(d)
    mine, oracle = regions.clone(), regions.clone()
    for step in range(STEPS):
        pos = [p + step for p in PROMPTS]
        q, k, v = _step(qkv, pos)
        want = ref.forward_decode(oracle, lay, cfg, table, pos, q, k, v, scale, own_from)
        got = CpuOps.forward_decode(mine, lay, cfg, table, pos, q, k, v, scale, own_from)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(lay.views(mine).tag, lay.views(oracle).tag), step
        _assert_pages(lay, mine, oracle)
    plain, shared = regions.clone(), regions.clone()   # the check can fail: without own_from, row 0 adds
    CpuOps.forward_decode(plain, lay, cfg, table, PROMPTS, *_step(qkv, PROMPTS), scale)   # its scores there
    CpuOps.forward_decode(shared, lay, cfg, table, PROMPTS, *_step(qkv, PROMPTS), scale, own_from)
    assert not torch.equal(plain[table[5, :2].long()], shared[table[5, :2].long()])
    with pytest.raises(RuntimeError, match="own_from"):
        decode_step(regions, lay, table, torch.tensor(PROMPTS), *_step(qkv, PROMPTS), scale,
                    torch.tensor([3, 0, 0, 0, 0, 0]), torch.zeros(6, dtype=torch.int64))


def test_bad_block_table_raises():
    cfg, group, d = CONFIGS["mikv"]
    lay, regions, table, qkv, _ = _setup(cfg, group, d)
    q, k, v = _step(qkv, PROMPTS)
    bad = table.clone()
    bad[0, 0] = regions.shape[0]
    with pytest.raises(RuntimeError, match="out of range"):
        decode_step(regions, lay, bad, torch.tensor(PROMPTS), q, k, v, 0.1)


def test_build_failure_raises_with_compiler_error(tmp_path, monkeypatch):
    from mikv_vllm.cpu import CpuOpBuildError, build

    bad = tmp_path / "broken.cpp"
    bad.write_text("this is not C++;\n")
    monkeypatch.setattr(build, "SOURCES", [bad])
    monkeypatch.setattr(build, "_MODULE", None)
    monkeypatch.setenv(build.BUILD_DIR_ENV, str(tmp_path / "ext"))
    with pytest.raises(CpuOpBuildError, match="MIKV_VLLM_OPS=torch") as info:
        build.load()
    assert "broken.cpp" in str(info.value) and "error" in str(info.value)    # the compiler's message


def test_hi_roundtrip_fp8_matches_torch():
    """C++ store_hi/load_hi for fp8 e4m3fn = core.quant.to_hi (clamp to +-448, round to nearest even)
    bit for bit: every fp8 value, midpoints between neighbours (ties), beyond-range values, NaN."""
    from mikv_vllm.core.quant import to_hi

    every = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    finite = every[torch.isfinite(every)].unique()
    mids = (finite[1:] + finite[:-1]) / 2
    x = torch.cat([finite, mids, torch.tensor([448.5, 470.0, 480.0, 1e6, -1e6, float("inf"), -float("inf"),
                                               float("nan"), 1e-9, -1e-9]),
                   torch.randn(2000, generator=torch.Generator().manual_seed(0)) * 50])
    x = x[: x.numel() // 8 * 8].reshape(-1, 8)
    raw, back = load().hi_roundtrip(x.contiguous(), 3)
    want = to_hi(x, torch.float8_e4m3fn)
    assert torch.equal(raw, want.view(torch.uint8))
    torch.testing.assert_close(back, want.float(), rtol=0, atol=0, equal_nan=True)
    for code, dt in ((0, torch.float16), (1, torch.bfloat16)):   # the other hi dtypes keep their conversions
        y = torch.randn(4, 8)
        torch.testing.assert_close(load().hi_roundtrip(y, code)[1], y.to(dt).float(), rtol=0, atol=0)
