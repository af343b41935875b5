"""Store kernel vs core.reference.write_tokens: bit-exact pages."""

import pytest
import torch

from mikv_vllm.core import reference as ref
from mikv_vllm.core.layout import RegionLayout
from mikv_vllm.kernels import store_tokens, write_tokens

from ._util import assert_pages_match, make_config


def _pages(layout, blocks=5, heads=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (blocks, heads, layout.region_bytes), dtype=torch.uint8, generator=gen)


@pytest.mark.parametrize("bits,hi_ratio,head_dim,balancer,extra", [
    (2, 0.2, 64, True, {}), (3, 0.05, 128, True, {}), (4, 0.0, 64, False, {}), (8, 0.25, 64, False, {}),
    (0, 0.25, 64, False, {}), (3, 0.1, 64, True, dict(group_size=64, hi_dtype="float8_e4m3fn")),
    (4, 0.0, 128, False, dict(group_size=128)),
])
def test_write_tokens_bit_exact(bits, hi_ratio, head_dim, balancer, extra):
    layout = RegionLayout.build(make_config(bits, hi_ratio, balancer, **extra), 8, head_dim)
    gen = torch.Generator().manual_seed(bits)
    pages = _pages(layout)
    row = torch.tensor([3, 0, 4])
    k = torch.randn(5, 2, head_dim, generator=gen) * 4 + 1     # positions 6..10: crosses offset 0 of block 0
    v = torch.randn(5, 2, head_dim, generator=gen).half()      # model dtype input
    b = (torch.rand(2, head_dim, generator=gen) * 3 + 0.1).half().float() if balancer else None
    expected, got = pages.clone(), pages.clone()
    ref.write_tokens(expected, layout, row, 6, k, v, b)
    write_tokens(got, layout, row, 6, k, v, b)
    assert_pages_match(expected, got, layout, score_rtol=0)
    if layout.hi_slots:
        assert (layout.views(got).tag[0] == 0).all()     # block whose offset 0 was written: tags reset
        assert not (layout.views(got).tag[3] == 0).all()  # untouched offset 0: stale tags kept


# keys and values at their own widths (k_bits, v_bits), each with both group metadata formats
SPLIT = [(4, 3, "fp8-scale"), (2, 4, "fp16"), (3, 2, "fp8-scale"), (4, 4, "fp8-scale"), (8, 2, "fp16")]


@pytest.mark.parametrize("k_bits,v_bits,meta", SPLIT)
def test_split_widths_and_group_meta_bit_exact(k_bits, v_bits, meta):
    """K codes at k_bits, V codes at v_bits, (scale, zero) as two fp16 or fp8-scale's three bytes:
    the page bytes of the oracle, for per-token and shared balancers."""
    cfg = make_config(k_bits, 0.25, True).replace(k_bits=k_bits, v_bits=v_bits, group_meta=meta)
    layout = RegionLayout.build(cfg, 8, 64)
    assert (layout.k_bits, layout.v_bits, layout.group_meta) == (k_bits, v_bits, meta)
    gen = torch.Generator().manual_seed(k_bits * 10 + v_bits)
    pages = _pages(layout)
    k = torch.randn(5, 2, 64, generator=gen) * 4 + 1
    v = torch.randn(5, 2, 64, generator=gen) * 3
    b = (torch.rand(2, 64, generator=gen) * 3 + 0.1).half().float()
    expected, got = pages.clone(), pages.clone()
    ref.write_tokens(expected, layout, torch.tensor([3, 0, 4]), 6, k, v, b)
    write_tokens(got, layout, torch.tensor([3, 0, 4]), 6, k, v, b)
    assert_pages_match(expected, got, layout, score_rtol=0)
    blk, off = torch.tensor([4, 1, 2]), torch.tensor([0, 7, 5])
    bal = (torch.rand(3, 2, 64, generator=gen) + 0.5).half().float()
    for i in range(3):
        ref.write_tokens(expected, layout, blk[i:i + 1], int(off[i]), k[i:i + 1], v[i:i + 1], bal[i])
    store_tokens(got, layout, blk, off, k[:3], v[:3], bal)
    assert_pages_match(expected, got, layout, score_rtol=0)


@pytest.mark.parametrize("meta", ["fp16", "fp8-scale"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_edge_values_bit_exact(bits, meta):
    """Constant groups, huge (clamped) values, tiny values, exact rounding ties, fp16 inputs."""
    layout = RegionLayout.build(make_config(bits, 0.0, False, group_meta=meta), 8, 16)
    qmax = (1 << bits) - 1
    rows = [
        torch.full((16,), 3.0),                                   # constant, fp16-exact
        torch.full((16,), 0.1),                                   # constant, not fp16-exact
        torch.linspace(-1e6, 1e6, 16),                            # beyond fp16 range
        torch.linspace(-1e-6, 1e-6, 16),                          # subnormal scale
        torch.zeros(16),
        torch.tensor([0.0, qmax] + [min(j + 0.5, qmax) for j in range(6)] * 2 + [0.0, qmax]),  # x.5 ties
        torch.randn(16) * 1e4,
        torch.randn(16).half().float(),
    ]
    k = torch.stack(rows)[:, None].expand(-1, 1, -1).contiguous()
    v = k.flip(0).contiguous()
    pages = _pages(layout, blocks=1, heads=1)
    expected, got = pages.clone(), pages.clone()
    ref.write_tokens(expected, layout, torch.tensor([0]), 0, k, v)
    write_tokens(got, layout, torch.tensor([0]), 0, k.half().float(), v)   # same values, other storage
    write_tokens(got, layout, torch.tensor([0]), 0, k, v)
    assert_pages_match(expected, got, layout, score_rtol=0)


def test_store_tokens_batched_per_token_balancer():
    """One launch for tokens of different requests, each with its own balancer."""
    layout = RegionLayout.build(make_config(2, 0.2, True), 16, 64)
    gen = torch.Generator().manual_seed(1)
    k, v = torch.randn(3, 2, 64, generator=gen), torch.randn(3, 2, 64, generator=gen)
    bal = (torch.rand(3, 2, 64, generator=gen) + 0.5).half().float()
    blk, off = torch.tensor([4, 1, 2]), torch.tensor([0, 7, 15])
    pages = _pages(layout)
    expected, got = pages.clone(), pages.clone()
    for i in range(3):
        ref.write_tokens(expected, layout, blk[i:i + 1], int(off[i]), k[i:i + 1], v[i:i + 1], bal[i])
    store_tokens(got, layout, blk, off, k, v, bal)
    assert_pages_match(expected, got, layout, score_rtol=0)
