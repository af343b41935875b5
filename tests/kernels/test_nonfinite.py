"""Non-finite K/V in the Triton store and upkeep kernels (interpreted): the oracle's semantics
(core.quant: NaN -> 0 and +-inf -> +-65504 before quantizing, hi copies NaN -> 0), byte for byte."""

import pytest
import torch

from mikv_vllm.config import preset
from mikv_vllm.core import reference as ref
from mikv_vllm.ops import torch_decode as tdec
from mikv_vllm.core.layout import RegionLayout
from mikv_vllm.kernels import write_tokens
from mikv_vllm.kernels.upkeep import maintain_hi_decode

from ._util import assert_pages_match, make_config

NAN, INF = float("nan"), float("inf")


def _poisoned(t: int, h: int, d: int, group: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(t, h, d, generator=gen) * 4 + 1           # positive: a NaN read as 0 moves the zero point
    x[0, 0, :group] = NAN                                    # an all-NaN group
    x[1, 0, 2], x[1, 1, min(group, d - 1)] = NAN, INF
    x[2, 1, :] = -INF
    return x


def test_store_kernel_non_finite_bit_exact():
    for bits, extra in ((2, {}), (3, dict(group_size=64)), (4, {}), (8, {})):
        layout = RegionLayout.build(make_config(bits, 0.2, True, **extra), 8, 64)
        k, v = _poisoned(4, 2, 64, layout.group, bits), _poisoned(4, 2, 64, layout.group, bits + 10).flip(0)
        b = (torch.rand(2, 64, generator=torch.Generator().manual_seed(1)) * 3 + 0.1).half().float()
        pages = torch.randint(0, 256, (3, 2, layout.region_bytes), dtype=torch.uint8,
                              generator=torch.Generator().manual_seed(2))
        expected, got = pages.clone(), pages.clone()
        row = torch.tensor([2, 0])
        ref.write_tokens(expected, layout, row, 6, k, v, b)
        write_tokens(got, layout, row, 6, k, v, b)
        assert_pages_match(expected, got, layout, score_rtol=0)
        views = layout.views(got)
        for sz in (views.k_sz, views.v_sz):      # positions 6..9: block 2 offsets 6, 7; block 0 offsets 0, 1
            assert torch.isfinite(sz[2, :, 6:8].float()).all() and torch.isfinite(sz[0, :, 0:2].float()).all()


def test_upkeep_kernel_hi_copy_of_nan_is_zero():
    cfg = preset("mikv-paper")
    lay = RegionLayout.build(cfg, 8, 16)
    table = torch.tensor([[1, 0]], dtype=torch.int32)
    pos = torch.tensor([2])
    k, v = _poisoned(3, 2, 16, lay.group, 5)[2:3], _poisoned(3, 2, 16, lay.group, 6)[0:1]
    regions = torch.zeros(2, 2, lay.region_bytes, dtype=torch.uint8)
    want = regions.clone()
    mass = torch.full((1, 2, 3), 0.25)
    tdec.maintain_hi_decode(want, lay, cfg, table, pos, k, v, mass)
    maintain_hi_decode(regions, lay, cfg, table, pos, k, v, mass[:, :, 2])
    assert torch.equal(regions, want)
    hi = lay.views(want).k_hi.float(), lay.views(want).v_hi.float()
    assert all(torch.isfinite(x).all() for x in hi) and (lay.views(want).tag > 0).any()


def test_poisoned_token_is_confined_in_the_triton_ops():
    """The Triton op set's entry sanitizes q/k/v as the reference does (core/test_nonfinite.py)."""
    from core.test_nonfinite import LAYOUTS, CONFIGS, assert_confined, poisoned_vs_sanitized
    from mikv_vllm.kernels._common import supported
    from mikv_vllm.kernels.ops import TritonOps

    name = "int3-fp16-hi-r0.3"
    assert supported(LAYOUTS[id(CONFIGS[name])])       # the kernels run, not the reference fallback
    assert_confined(*poisoned_vs_sanitized(TritonOps, name))


def _plant_nan_score(regions, lay, cfg, row, ctx):
    """NaN into the score of a live heavy-tier hi slot of ``row`` (KV head 0); returns (block, slot)."""
    from mikv_vllm.core.importance import hi_budget, recent_window

    views, n, r = lay.views(regions), lay.block_size, lay.hi_slots
    budget = hi_budget(cfg, ctx + 1, (ctx // n + 1) * r)
    rstart = ctx + 1 - recent_window(cfg, budget)
    for j in range(-(-ctx // n)):
        blk = int(row[j])
        for s in range(r):
            tag = int(views.tag[blk, 0, s])
            if 0 < tag <= ctx and cfg.sink_tokens <= tag - 1 < rstart:
                views.score[blk, 0, s] = float("nan")
                return blk, s
    raise AssertionError("no heavy hi slot to poison")


@pytest.mark.parametrize("policy", ["mikv", "h2o"])
def test_nan_score_and_non_finite_inputs_agree_in_oracle_cpp_and_triton(policy):
    """(d) A NaN score ranks last (the token is evicted first) and NaN / inf in q / k / v give the same
    outputs, scores, selection and page bytes in the oracle, the C++ op and the Triton decode step."""
    from core._helpers import assert_pages, make_regions, structured_qkv
    from mikv_vllm.cpu import CpuOps, load
    from mikv_vllm.kernels.ops import TritonOps

    load()
    cfg = preset(policy).replace(hi_ratio=0.25)
    n, hkv, grp, d, scale = 16, 2, 2, 64, 0.125
    lay = RegionLayout.build(cfg, n, d)
    regions = make_regions(lay, 12, hkv, garbage=True, seed=5)
    table = torch.randperm(12, generator=torch.Generator().manual_seed(5))[:8].reshape(2, 4).int()
    ctx = [41, 41]                       # budget floor(0.25 * 42) = floor(0.25 * 41): one hi token loses
    qkv = [structured_qkv(50, grp * hkv, hkv, d, seed=30 + i) for i in range(2)]
    for i, c in enumerate(ctx):
        ref.forward_request(regions, lay, cfg, table[i], 0, *(x[:c] for x in qkv[i]), scale)
    blk, slot = _plant_nan_score(regions, lay, cfg, table[0], ctx[0])
    planted = int(lay.views(regions).tag[blk, 0, slot])
    q, k, v = (torch.stack([x[c] for x, c in zip(part, ctx)]) for part in zip(*qkv))
    q[1, 0, :3] = NAN
    q[1, 2, 5] = INF
    k[1, 1, 7], v[1, 0, 9] = -INF, NAN
    from mikv_vllm.kernels import step

    pages, outs = {}, {}
    for name, ops, tile in (("oracle", None, None), ("cpp", CpuOps, None), ("triton", TritonOps, None),
                            ("triton-tiles-of-2", TritonOps, 2)):
        pages[name] = regions.clone()
        fwd = ref.forward_decode if ops is None else ops.forward_decode
        step.UPKEEP_TILE = tile           # 2: the upkeep walks each row's slots in several tiles
        try:
            outs[name] = fwd(pages[name], lay, cfg, table, ctx, q, k, v, scale)
        finally:
            step.UPKEEP_TILE = None
    assert planted not in lay.views(pages["oracle"]).tag[table[0].long(), 0].flatten().tolist()   # NaN: evicted
    for name in ("cpp", "triton", "triton-tiles-of-2"):
        assert torch.isfinite(outs[name]).all(), name
        torch.testing.assert_close(outs[name], outs["oracle"], rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
        assert_pages(lay, pages[name], pages["oracle"], name)
