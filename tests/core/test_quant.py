"""Per-token asymmetric RTN quantization and bit packing."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mikv_vllm.core.quant import (dequantize, dequantize_codes, fake_quantize, fp16_round_down, fp16_round_up,
                                  pack_codes, quantize, quantize_codes, unpack_codes)

BITS = st.sampled_from([2, 3, 4, 8])
FP16_FLOATS = st.floats(-65504, 65504, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=60, deadline=None)
@given(bits=BITS, chunks=st.integers(1, 6), lead=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_pack_unpack_round_trip(bits, chunks, lead, seed):
    d = 8 * chunks
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (lead, 2, d), generator=gen, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (lead, 2, d * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, d), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_matches_little_endian_bit_stream(bits):
    gen = torch.Generator().manual_seed(bits)
    d = 24
    codes = torch.randint(0, 1 << bits, (d,), generator=gen, dtype=torch.uint8)
    stream = 0
    for j, c in enumerate(codes.tolist()):
        stream |= c << (j * bits)          # element j at stream bits [j*b, (j+1)*b)
    expected = [(stream >> (8 * m)) & 0xFF for m in range(d * bits // 8)]   # stream bit 8m+k = bit k of byte m
    assert pack_codes(codes, bits).tolist() == expected


def test_pack_known_bytes():
    assert pack_codes(torch.tensor([1, 2, 3, 0, 0, 0, 0, 0], dtype=torch.uint8), 2).tolist() == [0b00111001, 0]
    # 3-bit: 5 | 6<<3 | 7<<6 | 1<<9 = 1013 -> bytes 245, 3, 0
    assert pack_codes(torch.tensor([5, 6, 7, 1, 0, 0, 0, 0], dtype=torch.uint8), 3).tolist() == [245, 3, 0]
    assert pack_codes(torch.tensor([0xA, 0x5] + [0] * 6, dtype=torch.uint8), 4).tolist() == [0x5A, 0, 0, 0]


def test_pack_rejects_bad_shapes():
    with pytest.raises(ValueError):
        pack_codes(torch.zeros(5, dtype=torch.uint8), 3)
    with pytest.raises(ValueError):
        pack_codes(torch.zeros(8, dtype=torch.uint8), 5)
    with pytest.raises(ValueError):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 2, 16)


@settings(max_examples=100, deadline=None)
@given(x=arrays(np.float32, 32, elements=FP16_FLOATS))
def test_fp16_directed_rounding(x):
    t = torch.from_numpy(x)
    down, up = fp16_round_down(t), fp16_round_up(t)
    assert down.dtype == up.dtype == torch.float16
    assert (down.float() <= t).all() and (up.float() >= t).all()
    assert (up.float() - down.float() <= torch.finfo(torch.float16).eps * t.abs() + 6e-8).all()


def _check_bound(x, bits, group):
    packed, sz = quantize(x, bits, group)
    d = x.shape[-1]
    assert packed.shape == (*x.shape[:-1], d * bits // 8)
    assert sz.shape == (*x.shape[:-1], d // group, 2) and sz.dtype == torch.float16
    xh = dequantize(packed, sz, bits, group, d)
    assert torch.isfinite(xh).all() and torch.isfinite(sz).all()
    scale = sz[..., 0].float().repeat_interleave(group, -1)
    zero = sz[..., 1].float().repeat_interleave(group, -1)
    assert (scale >= 0).all()
    qmax = (1 << bits) - 1
    # fp32 arithmetic slack; 2^-126 absorbs fp32 subnormal inputs that the CPU may flush to zero
    # (FTZ/DAZ, which some native libraries switch on for the whole process)
    eps = 2.0 ** -21 * (zero.abs() + qmax * scale + x.abs()) + 2.0 ** -126
    err = (x.float() - xh).abs()
    assert (err <= scale / 2 + eps).all(), (err - scale / 2).max()
    return packed, sz, xh


@settings(max_examples=150, deadline=None)
@given(bits=BITS, x=arrays(np.float32, (2, 16), elements=FP16_FLOATS), group=st.sampled_from([4, 8, 16]))
def test_error_bound_any_values(bits, x, group):
    _check_bound(torch.from_numpy(x), bits, group)


@settings(max_examples=100, deadline=None)
@given(bits=BITS, x=arrays(np.float32, (3, 8), elements=st.floats(-2.0**-10, 2.0**-10, width=32)))
def test_error_bound_tiny_values(bits, x):
    _check_bound(torch.from_numpy(x), bits, 4)     # subnormal fp16 scales


@settings(max_examples=100, deadline=None)
@given(bits=BITS, c=FP16_FLOATS)
def test_constant_groups(bits, c):
    x = torch.full((2, 8), c)
    packed, sz, xh = _check_bound(x, bits, 8)
    if float(torch.tensor(c).half().float()) == c:        # fp16-representable: exact
        assert torch.equal(xh, x) and (sz[..., 0] == 0).all()


def test_codes_come_from_stored_fp16_values():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 32, generator=gen) * 3.3
    codes, sz = quantize_codes(x, 3, 16)
    s = sz[..., 0].float().repeat_interleave(16, -1)
    z = sz[..., 1].float().repeat_interleave(16, -1)
    expect = torch.floor((x - z) / s + 0.5).clamp(0, 7)
    assert torch.equal(codes.float(), expect)
    assert torch.equal(dequantize_codes(codes, sz, 16), z + codes.float() * s)


def test_range_endpoints_and_nonfinite_free():
    x = torch.tensor([[-65504.0, 65504.0, 0.0, 1.0], [1e6, -1e6, 3.0, 3.0]])
    _, sz = quantize(x, 2, 4)
    assert torch.isfinite(sz).all()
    assert torch.isfinite(fake_quantize(x, 2, 4)).all()


def test_error_decreases_with_bits():
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    errs = [(fake_quantize(x, b, 32) - x).pow(2).mean().item() for b in (2, 3, 4, 8)]
    assert errs[0] > errs[1] > errs[2] > errs[3] > 0
    assert errs[3] < 1e-4


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_table_unpack_equals_bit_unpack(bits):
    from mikv_vllm.core.quant import unpack_codes_float
    gen = torch.Generator().manual_seed(bits)
    packed = torch.randint(0, 256, (5, 3, 64 * bits // 8), dtype=torch.uint8, generator=gen)
    assert torch.equal(unpack_codes_float(packed, bits, 64), unpack_codes(packed, bits, 64).float())
