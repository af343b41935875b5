"""Leaner group metadata (issue 26): the fp8-scale format (scale rounded up to fp8 e5m2, fp16 zero,
3 B per group instead of 4) in the layout, the quantizer, the oracle and the torch op set."""

import math

import pytest
import torch

from mikv_vllm.config import MiKVConfig, MiKVConfigError, preset
from mikv_vllm.core.layout import RegionLayout
from mikv_vllm.core.quant import (dequantize_codes, e5m2_round_up, pack_meta, quantize_codes, unpack_meta)

from ._helpers import decode_after_prefill, dense_attention

HQ, HKV, D, N = 6, 2, 32, 16
SCALE = 1 / math.sqrt(D)


def test_e5m2_round_up_is_the_smallest_e5m2_not_below():
    x = torch.cat([torch.rand(4000) * 10.0 ** torch.randint(-7, 5, (4000,)), torch.tensor([0.0, 1.0, 1.5, 43680.0])])
    x = x.clamp(max=43680.0).half()
    up = e5m2_round_up(x)
    table = torch.arange(0, 0x7C, dtype=torch.uint8).view(torch.float8_e5m2).float()   # every finite e5m2 >= 0
    assert torch.equal(up.float(), table[torch.searchsorted(table, x.float())])         # smallest not below x
    assert e5m2_round_up(torch.tensor([1.0, 0.0]).half()).tolist() == [1.0, 0.0]      # exact values stay


def test_pack_meta_round_trip_and_bytes():
    scale = e5m2_round_up(torch.rand(3, 5, 2).half() * 4)
    sz = torch.stack([scale, torch.randn(3, 5, 2).half()], dim=-1)
    packed = pack_meta(sz)
    assert packed.shape == (3, 5, 2, 3) and packed.dtype == torch.uint8
    assert torch.equal(unpack_meta(packed), sz)
    one = sz[:1, :1, :1]                      # one group of one token: size-1 dims with any strides
    assert torch.equal(pack_meta(one), packed[:1, :1, :1]) and torch.equal(unpack_meta(pack_meta(one)), one)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fp8_scale_keeps_the_error_bound(bits):
    x = torch.randn(64, 2, 64) * torch.tensor([0.01, 300.0])[None, :, None] + 5
    codes, sz = quantize_codes(x, bits, 32, scale_fp8=True)
    xh = dequantize_codes(codes, sz, 32)
    s = sz[..., 0].float().repeat_interleave(32, -1)
    assert (x - xh).abs().le(s / 2 + 1e-5 * x.abs() + 1e-6).all()
    _, sz16 = quantize_codes(x, bits, 32)
    assert (sz[..., 0] >= sz16[..., 0]).all() and torch.equal(sz[..., 1], sz16[..., 1])   # scale up, zero same


def test_layout_bytes_and_config():
    # the default's K4/V3 at D 64, N 128 with fp8-scale: 1 group x 3 B per K and per V -> lo 62 B; 70 - 2 = 68
    lay = RegionLayout.build(preset("mikv-int4-r03").replace(v_bits=3, group_meta="fp8-scale"), 128, 64)
    assert (lay.meta_bytes, lay.content_bytes, lay.breakdown()["lo_kv"]) == (3, 68, 62)
    assert lay.views(torch.zeros(lay.region_bytes, dtype=torch.uint8)).k_sz.shape == (128, 1, 3)
    assert RegionLayout.build(preset("rtn-int4").replace(group_meta="fp8-scale"), 128, 64).content_bytes == 76   # 80 - 2 x 2
    with pytest.raises(MiKVConfigError, match="group_meta"):
        MiKVConfig(group_meta="int8")


@pytest.mark.parametrize("path", ["oracle", "torch"])
def test_fp8_scale_page_equals_dense_fake_quant(path):
    cfg = MiKVConfig(policy="rtn", k_bits=4, v_bits=3, hi_ratio=0.0, sink_tokens=0, recent_window=0,
                     balancer=False, group_meta="fp8-scale")
    length = 40
    q, k, v, out = decode_after_prefill(cfg, path, N, D, HQ, HKV, SCALE, qkv_seed=6, page_seed=2, length=length)
    g = cfg.group_for(D)

    def fq(x, bits, fp8):
        return dequantize_codes(*quantize_codes(x, bits, g, scale_fp8=fp8), g)

    expect = dense_attention(q[length:], torch.cat([fq(k[:length], 4, True), k[length:]]),
                             torch.cat([fq(v[:length], 3, True), v[length:]]), SCALE, offset=length)
    assert (out - expect).abs().max().item() < 1e-5
    fp16 = dense_attention(q[length:], torch.cat([fq(k[:length], 4, False), k[length:]]),
                           torch.cat([fq(v[:length], 3, False), v[length:]]), SCALE, offset=length)
    assert (out - fp16).abs().max().item() > 1e-4                            # the scales really are fp8
