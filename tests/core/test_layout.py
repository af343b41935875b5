"""RegionLayout: sub-arrays are disjoint, aligned, in bounds; as_regions is a true view."""

import itertools
import subprocess
import sys

import pytest
import torch

from mikv_vllm.config import PRESETS, MiKVConfig, preset
from mikv_vllm.core.layout import ALIGN, RegionLayout, as_regions

FIELDS = ("k_lo", "v_lo", "k_sz", "v_sz", "score", "tag", "k_hi", "v_hi", "balancer")


@pytest.mark.parametrize("name,d,n", list(itertools.product(PRESETS, [64, 128], [16, 128])))
def test_views_disjoint_aligned_in_bounds(name, d, n):
    lay = RegionLayout.build(preset(name), n, d)
    regions = torch.zeros(3, 2, lay.region_bytes, dtype=torch.uint8)
    views = lay.views(regions)
    spans = []
    for f in FIELDS:
        t = getattr(views, f)
        assert t.shape[:2] == (3, 2)
        nbytes = t[0, 0].numel() * t.element_size()
        off = getattr(lay, f)
        assert off % ALIGN == 0 and off + nbytes <= lay.region_bytes
        if nbytes:
            spans.append((off, off + nbytes))
            t[1, 1].copy_(torch.ones(t[1, 1].shape))     # any dtype, fp8 included
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert regions[0].sum() == 0 and regions[2].sum() == 0 and regions[1, 0].sum() == 0
    assert lay.region_bytes == lay.content_bytes * n and lay.region_bytes % ALIGN == 0   # whole bytes per token


# Worked by hand (bytes of one (block, head) region; every sub-array starts 16-byte aligned; then
# bytes per token = region / N rounded up to a whole byte; one fp32 score per hi slot, not per token):
#   int3-r0.1 (INT3, r=0.1, fp16 hi, balancer), D=64, N=128: codes 24 B/token per K and per V, 2 groups
#   of fp16 (s, z) = 8 B per K and per V -> lo 64 B/token = 8192; R = ceil(12.8) = 13: tags 52 -> 64
#   aligned, scores 52 -> 64; hi K and V 13*64*2 = 1664 each; balancer 128.
#   8192 + 64 + 64 + 3328 + 128 = 11776 -> 92 B/token.
#   mikv-paper (INT2, r=0.2), D=128, N=16: codes 32 + s/z 8 per K/V -> lo 80/token = 1280; R =
#   ceil(3.2) = 4: tags 16, scores 16; hi 4*128*2 = 1024 each; balancer 256 -> 1280+16+16+2048+256
#   = 3616 -> 226 B/token.
#   rtn (INT2, no hi tier, no balancer), D=64, N=128: codes 16 + s/z 8 per K/V -> 48 B/token exactly.
#   h2o (no lo copy, r=0.2), D=64, N=16: R = 4, tags 16, scores 16; hi 4*64*2 = 512 each -> 1056
#   -> 66 B/token.
#   mikv-int4-r03 (INT4 in one group of 64, r=0.03, fp8 hi, balancer), D=64, N=128: codes 32 +
#   s/z 4 per K/V -> lo 72 B/token = 9216; R = ceil(3.84) = 4: tags 16, scores 16; hi K and V 4*64 =
#   256 each; balancer 128 -> 9216 + 16 + 16 + 512 + 128 = 9888 -> 77.25 -> 78 B/token.
#   mikv (the default: the same with values in INT3 and 3-byte group metadata): K codes 32 + 3,
#   V codes 24 + 3 -> lo 62 B/token = 7936; + 16 + 16 + 512 + 128 = 8608 -> 67.25 -> 68 B/token.
HAND = [
    ("int3-r0.1", 64, 128, 92, dict(lo_kv=64, score=52 / 128, tag=52 / 128, hi_kv=3328 / 128, balancer=1.0)),
    ("mikv-int4-r03", 64, 128, 78, dict(lo_kv=72, score=16 / 128, tag=16 / 128, hi_kv=512 / 128, balancer=1.0)),
    ("mikv", 64, 128, 68, dict(lo_kv=62, score=16 / 128, tag=16 / 128, hi_kv=512 / 128, balancer=1.0)),
    ("mikv-paper", 128, 16, 226, dict(lo_kv=80, score=1.0, tag=1.0, hi_kv=128, balancer=16.0)),
    ("rtn", 64, 128, 48, dict(lo_kv=48, score=0, tag=0, hi_kv=0, balancer=0)),
    ("h2o", 64, 16, 66, dict(lo_kv=0, score=1.0, tag=1.0, hi_kv=64, balancer=0)),
]


@pytest.mark.parametrize("name,d,n,total,parts", HAND)
def test_bytes_match_a_hand_computation(name, d, n, total, parts):
    cfg = MiKVConfig(policy="mikv", lo_bits=3, hi_ratio=0.1, hi_dtype="float16") if name == "int3-r0.1" else preset(name)
    lay = RegionLayout.build(cfg, n, d)
    assert lay.content_bytes == total
    br = lay.breakdown()
    for key, value in parts.items():
        assert br[key] == pytest.approx(value), key
    used = sum(parts.values())
    assert br["padding"] == pytest.approx(total - used) and 0 <= total - used < 1 + 9 * 15 / n


def test_integration_reference_figure():
    # vllm-0.32-integration.md §7: INT2, r = 0.2, N = 16, D = 128, no balancer header -> 216 B with a
    # score per token (4 B); with one score per hi slot (4 slots x 4 B / 16 tokens) it is 210 B
    cfg = MiKVConfig(policy="mikv", lo_bits=2, hi_ratio=0.2, balancer=False)
    assert RegionLayout.build(cfg, 16, 128).content_bytes == 210


def test_as_regions_is_a_view_and_rejects_strided_caches():
    lay = RegionLayout.build(preset("mikv"), 16, 64)
    kv = torch.zeros(4, 3, 16, lay.content_bytes // 2, dtype=torch.bfloat16)
    as_regions(kv, lay)[1, 2, 5] = 9
    assert kv.view(torch.uint8).sum() == 9
    strided = torch.zeros(16, 4, 3, lay.content_bytes // 2, dtype=torch.bfloat16).permute(1, 2, 0, 3)
    with pytest.raises(ValueError):
        as_regions(strided, lay)
    with pytest.raises(ValueError):
        as_regions(torch.zeros(4, 3, 16, 8, dtype=torch.bfloat16), lay)


def test_bits_must_pack_into_whole_bytes():
    with pytest.raises(ValueError):
        RegionLayout.build(MiKVConfig(policy="mikv", lo_bits=3, group_size=4), 16, 12)


def test_core_does_not_import_vllm():
    code = "import sys, mikv_vllm.core; assert not any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


# Keys and values at their own widths (issue 26), worked by hand:
#   mikv K4/V3 (one group of 64, r=0.03, fp8 hi, balancer), D=64, N=128: K codes 32 B + V codes 24 B
#   per token, 1 group of fp16 (s, z) = 4 B each -> lo 64 B/token; K_lo 4096 B, V_lo 3072 B, K s/z 512 B,
#   V s/z 512 B; R = 4: tags 16, scores 16, hi K and V 4*64 = 256 each, balancer 128
#   -> 4096 + 3072 + 512 + 512 + 16 + 16 + 256 + 256 + 128 = 8864 -> 69.25 -> 70 B/token.
def test_split_widths_sizes_offsets_and_views():
    cfg = preset("mikv-int4-r03").replace(v_bits=3)
    lay = RegionLayout.build(cfg, 128, 64)
    assert (lay.k_bits, lay.v_bits, lay.k_packed_bytes, lay.v_packed_bytes, lay.groups) == (4, 3, 32, 24, 1)
    assert (lay.k_lo, lay.v_lo, lay.k_sz, lay.v_sz, lay.tag, lay.score) == (0, 4096, 7168, 7680, 8192, 8208)
    assert (lay.k_hi, lay.v_hi, lay.balancer, lay.region_bytes) == (8224, 8480, 8736, 70 * 128)
    br = lay.breakdown()
    assert br["total"] == 70 and br["lo_kv"] == 64 and br["hi_kv"] == 4
    assert sum(v for k, v in br.items() if k != "total") == pytest.approx(br["total"])
    views = lay.views(torch.zeros(2, 3, lay.region_bytes, dtype=torch.uint8))
    assert views.k_lo.shape == (2, 3, 128, 32) and views.v_lo.shape == (2, 3, 128, 24)
    assert views.k_sz.shape == views.v_sz.shape == (2, 3, 128, 1, 2)
    with pytest.raises(ValueError, match="k_bits 4 != v_bits 3"):
        lay.bits                                          # transitional: only a common width reads
    with pytest.raises(ValueError, match="k_bits 4 != v_bits 3"):
        lay.packed_bytes
    # the same widths given apart or through lo_bits build the same layout
    assert (RegionLayout.build(preset("mikv-int4-r03").replace(k_bits=4, v_bits=4), 128, 64)
            == RegionLayout.build(preset("mikv-int4-r03"), 128, 64))
    assert RegionLayout.build(preset("mikv-int4-r03"), 128, 64).bits == 4


@pytest.mark.parametrize("k,v,d,n", [(4, 2, 64, 16), (2, 4, 128, 128), (8, 3, 64, 128), (3, 4, 128, 16)])
def test_split_widths_views_disjoint_and_sum(k, v, d, n):
    lay = RegionLayout.build(MiKVConfig(policy="mikv", k_bits=k, v_bits=v, hi_ratio=0.1), n, d)
    views = lay.views(torch.zeros(lay.region_bytes, dtype=torch.uint8))
    sizes = {f: getattr(views, f).numel() * getattr(views, f).element_size() for f in FIELDS}
    assert (sizes["k_lo"], sizes["v_lo"]) == (n * d * k // 8, n * d * v // 8)
    spans = sorted((getattr(lay, f), getattr(lay, f) + sizes[f]) for f in FIELDS)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] <= lay.region_bytes
    br = lay.breakdown()
    assert br["lo_kv"] == d * (k + v) / 8 + 2 * 4 * lay.groups
    assert sum(x for key, x in br.items() if key != "total") == pytest.approx(br["total"])


def test_split_widths_must_pack_into_whole_bytes():
    with pytest.raises(ValueError, match="v_bits 3"):
        RegionLayout.build(MiKVConfig(policy="mikv", k_bits=4, v_bits=3, group_size=4), 16, 12)
