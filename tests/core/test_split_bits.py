"""Keys and values at their own widths (issue 26): the oracle and the batched torch op set against a
dense fake-quant reference (cached keys at k_bits, values at v_bits, the hi tier in its dtype)."""

import math

import pytest
import torch

from mikv_vllm.config import MiKVConfig, preset
from mikv_vllm.core.balancer import compute_balancer, from_storage, to_storage, unbalance_keys
from mikv_vllm.core.layout import RegionLayout
from mikv_vllm.core.quant import fake_quantize, to_hi
from mikv_vllm.core.reference import forward_request
from mikv_vllm.ops.torch_ops import TorchOps

from ._helpers import decode_after_prefill, dense_attention, make_regions, run_request, structured_qkv

HQ, HKV, D, N = 6, 2, 32, 16
SCALE = 1 / math.sqrt(D)
SPLIT = {
    "rtn-k4v2": MiKVConfig(policy="rtn", k_bits=4, v_bits=2, hi_ratio=0.0, sink_tokens=0, recent_window=0,
                           balancer=False),
    "rtn-k2v4": MiKVConfig(policy="rtn", k_bits=2, v_bits=4, hi_ratio=0.0, sink_tokens=0, recent_window=0,
                           balancer=False),
    "rtn-k4v3": MiKVConfig(policy="rtn", k_bits=4, v_bits=3, hi_ratio=0.0, sink_tokens=0, recent_window=0,
                           balancer=False),
}


@pytest.mark.parametrize("name", sorted(SPLIT))
@pytest.mark.parametrize("path", ["oracle", "torch"])
def test_uniform_split_widths_equal_dense_fake_quant(name, path):
    """No hi tier, no balancer: a decode step attends to the cached keys fake-quantized at k_bits and
    values at v_bits (one group width for both) plus the raw new token, exactly."""
    cfg = SPLIT[name]
    length = 40
    q, k, v, out = decode_after_prefill(cfg, path, N, D, HQ, HKV, SCALE, qkv_seed=5, page_seed=1, length=length)
    g = cfg.group_for(D)
    kk = torch.cat([fake_quantize(k[:length], cfg.k_bits, g), k[length:]])
    vv = torch.cat([fake_quantize(v[:length], cfg.v_bits, g), v[length:]])
    expect = dense_attention(q[length:], kk, vv, SCALE, offset=length)
    assert (out - expect).abs().max().item() < 1e-5
    # the same page read with the widths swapped is a different (worse-keyed or worse-valued) cache
    swapped = dense_attention(q[length:], torch.cat([fake_quantize(k[:length], cfg.v_bits, g), k[length:]]),
                              torch.cat([fake_quantize(v[:length], cfg.k_bits, g), v[length:]]), SCALE, offset=length)
    assert (out - swapped).abs().max().item() > 1e-3


@pytest.mark.parametrize("v_bits", [3, 2])
@pytest.mark.parametrize("path", ["oracle", "torch"])
def test_mikv_split_widths_equal_dense_fake_quant(v_bits, path):
    """The default's K4 / V<v_bits> (balancer, fp8 hi tier): a one-token prompt then decode steps; the
    last step rebuilt by hand: the sinks hi (fp8), other cached keys balanced and fake-quantized at
    4 bits, values at ``v_bits``, the new token raw."""
    cfg = preset("mikv-int4-r03").replace(v_bits=v_bits, hi_ratio=0.25)
    lay = RegionLayout.build(cfg, N, D)
    q, k, v = structured_qkv(8, HQ, HKV, D, seed=8)
    regions = make_regions(lay, 2, HKV, garbage=True)
    row = torch.tensor([1])
    run_request(regions, lay, cfg, row, q[:7], k[:7], v[:7], [1] * 7, SCALE)
    if path == "oracle":
        out = forward_request(regions, lay, cfg, row, 7, q[7:], k[7:], v[7:], SCALE)
    else:
        out = TorchOps.forward_decode(regions, lay, cfg, row[None], [7], q[7:], k[7:], v[7:], SCALE)
    b = from_storage(to_storage(compute_balancer(q[:1], k[:1])))
    g = cfg.group_for(D)
    lo_k = unbalance_keys(fake_quantize(k * b, 4, g), b)
    lo_v = fake_quantize(v, v_bits, g)
    hi = min(cfg.sink_tokens, lay.hi_slots)
    assert hi == 4
    kk = torch.stack([to_hi(k[i], lay.hi_dtype).float() if i < hi else (lo_k[i] if i < 7 else k[i]) for i in range(8)])
    vv = torch.stack([to_hi(v[i], lay.hi_dtype).float() if i < hi else (lo_v[i] if i < 7 else v[i]) for i in range(8)])
    expect = dense_attention(q[7:], kk, vv, SCALE, offset=7)
    assert (out - expect).abs().max().item() < 1e-5


def test_value_bits_cost_more_error_as_they_fall():
    """Keys fixed at 4 bits: the decode error grows as the value width falls (8 > 4 > 3 > 2)."""
    errs = {}
    for vb in (8, 4, 3, 2):
        cfg = MiKVConfig(policy="rtn", k_bits=4, v_bits=vb, hi_ratio=0.0, sink_tokens=0, recent_window=0,
                         balancer=False)
        lay = RegionLayout.build(cfg, N, D)
        q, k, v = structured_qkv(72, HQ, HKV, D, seed=2)
        regions = make_regions(lay, 6, HKV, garbage=True)
        out = run_request(regions, lay, cfg, torch.arange(6), q, k, v, [48] + [1] * 24, SCALE)
        ref = dense_attention(q, k, v, SCALE)
        errs[vb] = ((out[48:] - ref[48:]).norm() / ref[48:].norm()).item()
    assert errs[8] < errs[4] < errs[3] < errs[2], errs
