"""Non-finite q / k / v in the fused C++ ops: the oracle's semantics (tests/core/test_nonfinite.py).

Through the op set (``CpuOps``) a poisoned token is confined exactly as in the reference; the raw
bindings apply ``quant.finite_inputs`` to q / k / v themselves (mikv_steps.h), and the C++ quantizer
and hi store keep every stored code, (scale, zero) and hi copy defined, also for finite values past
fp16's range.
"""

import pytest
import torch

from mikv_vllm.config import MiKVConfig
from mikv_vllm.core import reference as ref
from mikv_vllm.core.layout import RegionLayout
from mikv_vllm.core.quant import finite_inputs, pack_meta, quantize, to_hi, unpack_meta
from mikv_vllm.cpu import CpuOps, load
from mikv_vllm.cpu.ops import cpp_layout

from core._helpers import assert_pages, make_regions
from core.test_nonfinite import CONFIGS, assert_confined, poisoned_vs_sanitized

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_poisoned_token_is_confined_in_the_cpu_ops(name):
    lay, table, clean, bad, fixed = poisoned_vs_sanitized(CpuOps, name)
    assert_confined(lay, table, clean, bad, fixed)
    _, _, _, oracle, _ = poisoned_vs_sanitized(ref, name)        # and the poisoned run equals the oracle's
    torch.testing.assert_close(bad[0], oracle[0], rtol=1e-4, atol=1e-4)
    assert_pages(lay, bad[1], oracle[1], name)


def _raw_poisoned_kv(d: int, group: int):
    """k, v [1, 1, D]: positive values (so a NaN read as 0 moves the group's zero), one all-NaN group,
    a NaN element, +-inf elements, a finite key past fp16's range (kept by finite_inputs, clamped by
    the lo quantizer)."""
    gen = torch.Generator().manual_seed(3)
    k = torch.rand(1, 1, d, generator=gen) * 4 + 1
    v = torch.rand(1, 1, d, generator=gen) * 4 + 1
    k[0, 0, :group] = NAN
    k[0, 0, group + 1] = NAN
    k[0, 0, group + 2] = INF
    k[0, 0, group + 3] = 1e30
    v[0, 0, 3], v[0, 0, group + 5] = NAN, -INF
    return k, v


# (k_bits, v_bits, group_meta): each width for keys and values, alike and apart, both metadata formats
STORES = [(2, 2, "fp16"), (3, 3, "fp16"), (4, 4, "fp16"), (8, 8, "fp16"), (4, 2, "fp8-scale"), (2, 8, "fp8-scale"),
          (8, 3, "fp16"), (3, 4, "fp8-scale"), (8, 8, "fp8-scale")]


@pytest.mark.parametrize("kv", STORES, ids=[f"k{k}v{v}-{m}" for k, v, m in STORES])
@pytest.mark.parametrize("entry", ["decode", "prefill"])
def test_raw_cpp_store_of_non_finite_is_defined(kv, entry):
    """The raw C++ bindings (no op set in front): codes and (scale, zero) equal core.quant.quantize
    of the same values (NaN -> 0, +-inf -> +-65504, finite values clamped to +-65504; keys at k_bits,
    values at v_bits; fp8-scale records as quant.pack_meta packs them) byte for byte, every
    (scale, zero) finite, and the hi copy (r = 1, fp32) equals quant.to_hi of finite_inputs (NaN -> 0,
    +-inf -> +-65504, 1e30 kept)."""
    d, group, n = 32, 8, 8
    k_bits, v_bits, meta_format = kv
    cfg = MiKVConfig(policy="mikv", k_bits=k_bits, v_bits=v_bits, hi_ratio=1.0, hi_dtype="float32", balancer=False,
                     group_size=group, group_meta=meta_format)
    lay = RegionLayout.build(cfg, n, d)
    k, v = _raw_poisoned_kv(d, group)
    q = torch.randn(1, 1, d, generator=torch.Generator().manual_seed(4))
    pages = make_regions(lay, 2, 1, garbage=True, seed=2)
    table = torch.tensor([[1, 0]], dtype=torch.int32)
    meta = cpp_layout(lay)
    zero = torch.zeros(1, dtype=torch.int64)
    if entry == "decode":
        load().decode_step(pages, meta, table, zero, q, k, v, 0.1, True, True, 1.0, 4, -1, zero, zero)
    else:   # a 2-token chunk: the poisoned token second
        q2, k2, v2 = torch.cat([q, q]), torch.cat([k.nan_to_num(0) + 1, k]), torch.cat([v.nan_to_num(0) + 1, v])
        load().prefill_step(pages, meta, table, zero, torch.tensor([[0, 2]]), q2, k2, v2, 0.1, 1.0, 4, -1, -1,
                            zero, zero)
    off = 0 if entry == "decode" else 1
    views = lay.views(pages)
    for x, bits, lo, sz in ((k, k_bits, views.k_lo, views.k_sz), (v, v_bits, views.v_lo, views.v_sz)):
        want_lo, want_sz = quantize(x[0], bits, group, lay.scale_fp8)
        got_sz = unpack_meta(sz[1, 0, off]) if lay.scale_fp8 else sz[1, 0, off]
        assert torch.isfinite(got_sz.float()).all()
        want_bytes = pack_meta(want_sz[0]) if lay.scale_fp8 else want_sz[0]
        assert torch.equal(sz[1, 0, off], want_bytes) and torch.equal(lo[1, 0, off], want_lo[0])
    tags = views.tag[1, 0]
    slot = int((tags == off + 1).nonzero()[0, 0])
    assert torch.equal(views.k_hi[1, 0, slot], to_hi(finite_inputs(k[0, 0]), torch.float32))
    assert torch.equal(views.v_hi[1, 0, slot], to_hi(finite_inputs(v[0, 0]), torch.float32))


def test_hi_roundtrip_stores_nan_as_zero_in_every_dtype():
    x = torch.tensor([[NAN, -NAN, INF, -INF, 1.0, -3.5, 1e6, 0.0]])
    for code, dt in ((0, torch.float16), (1, torch.bfloat16), (2, torch.float32), (3, torch.float8_e4m3fn)):
        raw, back = load().hi_roundtrip(x, code)
        want = to_hi(x, dt)
        assert torch.equal(raw, want.view(torch.uint8).reshape(raw.shape)), dt
        assert torch.isfinite(back).all() and torch.equal(back, want.float()), dt


def test_selection_parameters_are_checked_before_any_write():
    cfg = MiKVConfig(policy="mikv", lo_bits=4, hi_ratio=0.5)
    lay = RegionLayout.build(cfg, 8, 32)
    pages = make_regions(lay, 2, 1, garbage=True, seed=5)
    before = pages.clone()
    table = torch.tensor([[1, 0]], dtype=torch.int32)
    zero = torch.zeros(1, dtype=torch.int64)
    q = k = v = torch.ones(1, 1, 32)
    for ratio in (NAN, INF, -0.5):
        with pytest.raises(RuntimeError, match="selection parameters"):
            load().decode_step(pages, cpp_layout(lay), table, zero, q, k, v, 0.1, True, True, ratio, 4, -1, zero,
                               zero)
        with pytest.raises(RuntimeError, match="selection parameters"):
            load().prefill_step(pages, cpp_layout(lay), table, zero, torch.tensor([[0, 1]]), q, k, v, 0.1, ratio,
                                4, -1, -1, zero, zero)
    assert torch.equal(pages, before)
