"""Decode attention kernel vs the reference (gather_context + attention) and full decode steps."""


import pytest
import torch

from mikv_vllm.core import reference as ref
from mikv_vllm.ops import torch_decode as tdec
from mikv_vllm.kernels import decode_attention, forward_decode, forward_request, hi_slot_map, use_triton
from mikv_vllm.ops import get_ops

from ._util import SCALE, assert_pages_match, build_batch, make_config, reference_decode, stored_balancers

# (lo bits, hi ratio, GQA group, head_dim, balancer, block size)
CASES = [
    (2, 0.2, 3, 64, True, 16),
    (3, 0.05, 8, 128, True, 16),
    (4, 0.0, 1, 64, False, 16),
    (8, 0.25, 1, 128, False, 8),
    (0, 0.25, 3, 64, False, 16),
    (2, 0.0, 8, 64, True, 32),
    (3, 0.5, 1, 64, True, 16),
]
CTXS = [37, 0, 16, 5]   # ragged: multi-split, first token, new token at a block's offset 0, short


# page formats: (lo bits, hi ratio, GQA group, head_dim, extra config fields)
FORMAT_CASES = [
    (3, 0.2, 3, 64, dict(group_size=64, hi_dtype="float8_e4m3fn")),
    (2, 0.1, 2, 128, dict(group_size=128, hi_dtype="float8_e4m3fn")),
    (4, 0.0, 2, 64, dict(group_size=64)),
    (0, 0.25, 3, 64, dict(hi_dtype="float8_e4m3fn")),
]

# keys and values at their own widths and the group metadata: (k_bits, v_bits, group_meta, hi ratio, GQA group)
SPLIT_CASES = [(4, 3, "fp8-scale", 0.2, 3), (2, 4, "fp16", 0.1, 2), (3, 2, "fp8-scale", 0.0, 1), (4, 4, "fp8-scale", 0.2, 2)]


def _split_config(k_bits, v_bits, meta, hi_ratio):
    return make_config(k_bits, hi_ratio, True).replace(k_bits=k_bits, v_bits=v_bits, group_meta=meta)


@pytest.mark.parametrize("k_bits,v_bits,meta,hi_ratio,group", SPLIT_CASES)
def test_decode_attention_split_widths_and_group_meta(k_bits, v_bits, meta, hi_ratio, group):
    """decode_attention reads K codes at k_bits, V codes at v_bits, fp16 or fp8-scale (scale, zero)."""
    _check_decode_attention(_split_config(k_bits, v_bits, meta, hi_ratio), k_bits + v_bits, group, 64, 16)


@pytest.mark.parametrize("k_bits,v_bits,meta,hi_ratio,group", SPLIT_CASES[:2] + SPLIT_CASES[3:])
def test_forward_decode_steps_split_widths_and_group_meta(k_bits, v_bits, meta, hi_ratio, group):
    """The decode step (kernels/step.py) stores and reads each width and metadata format as the oracle."""
    _check_forward_decode_steps(_split_config(k_bits, v_bits, meta, hi_ratio), group, 64, 16)


@pytest.mark.parametrize("bits,hi_ratio,group,head_dim,balancer,block_size", CASES)
def test_decode_attention_matches_reference(bits, hi_ratio, group, head_dim, balancer, block_size):
    _check_decode_attention(make_config(bits, hi_ratio, balancer), bits, group, head_dim, block_size)


@pytest.mark.parametrize("bits,hi_ratio,group,head_dim,extra", FORMAT_CASES)
def test_decode_attention_page_formats(bits, hi_ratio, group, head_dim, extra):
    """One quant group per head vector and fp8 hi copies (tl.float8e4nv under the interpreter)."""
    _check_decode_attention(make_config(bits, hi_ratio, bits > 0, **extra), bits, group, head_dim, 16)


@pytest.mark.parametrize("bits,hi_ratio,group,head_dim,extra", FORMAT_CASES[:2])
def test_forward_decode_steps_page_formats(bits, hi_ratio, group, head_dim, extra):
    _check_forward_decode_steps(make_config(bits, hi_ratio, True, **extra), group, head_dim, 16)


def _check_decode_attention(config, bits, group, head_dim, block_size):
    layout, regions, tables, q, k, v = build_batch(config, block_size, head_dim, 2, group, CTXS, seed=bits)
    bal = stored_balancers(regions, layout, tables, CTXS)
    exp_out, exp_mass = reference_decode(regions, layout, tables, CTXS, q, k, v, bal)
    before = regions.clone()
    out, mass = decode_attention(regions, layout, tables, torch.tensor(CTXS), q, k, v, SCALE, bal,
                                 tokens_per_split=16)
    assert torch.equal(regions, before)                  # no accumulate: pages untouched
    torch.testing.assert_close(out, exp_out, rtol=1e-4, atol=1e-5)
    if layout.hi_slots:
        for i, c in enumerate(CTXS):
            torch.testing.assert_close(mass[i, :, : c + 1], exp_mass[i], rtol=1e-4, atol=1e-6)
            assert (mass[i, :, c + 1:] == 0).all()
            torch.testing.assert_close(mass[i].sum(-1), torch.full((2,), float(group)), rtol=1e-5, atol=1e-5)
    else:
        assert mass is None


@pytest.mark.parametrize("bits,hi_ratio,group,head_dim,balancer,block_size", [CASES[0], CASES[3], CASES[4]])
def test_decode_score_accumulation_per_slot(bits, hi_ratio, group, head_dim, balancer, block_size):
    """``accumulate``: every hi slot whose tag is a context position gets its token's mass (planted
    duplicate tags: both slots), no other score changes (tags past the context, empty slots,
    other heads' and requests' slots); ``new_mass`` is the new token's mass. Against
    tdec.accumulate_scores_decode after the reference's store."""
    config = make_config(bits, hi_ratio, balancer)
    layout, regions, tables, q, k, v = build_batch(config, block_size, head_dim, 2, group, CTXS, seed=bits + 1)
    pos = torch.tensor(CTXS)
    bal = tdec.decode_balancer(regions, layout, tables, pos, q, k)
    ref.store_at(regions, layout, tables.long().gather(1, (pos // block_size)[:, None])[:, 0], pos % block_size,
                 k, v, bal)
    views, r = layout.views(regions), layout.hi_slots
    planted = 0
    for i, c in enumerate(CTXS):   # a duplicate of a hi token (same hi copy) and a tag past the context
        blocks = tables[i, : c // block_size + 1].long()
        for h in range(2):
            tags = views.tag[blocks, h].reshape(-1)
            free = (tags == 0).nonzero()[:, 0]
            used = ((tags > 0) & (tags <= c)).nonzero()[:, 0]
            if free.numel() >= 2 and used.numel():
                src, dup, past = int(used[-1]), int(free[0]), int(free[1])
                views.tag[blocks[dup // r], h, dup % r] = tags[src]
                views.k_hi[blocks[dup // r], h, dup % r] = views.k_hi[blocks[src // r], h, src % r]
                views.v_hi[blocks[dup // r], h, dup % r] = views.v_hi[blocks[src // r], h, src % r]
                views.tag[blocks[past // r], h, past % r] = c + 1 + h
                planted += 1
    assert planted >= 2
    expected, before = regions.clone(), regions.clone()
    k_ctx, v_ctx, valid = tdec.gather_decode(expected, layout, tables, pos, bal)
    want, mass = tdec.attention_decode(q, k_ctx, v_ctx, valid, pos, k, v, SCALE)
    tdec.accumulate_scores_decode(expected, layout, tables, pos, mass)
    new_mass = torch.full((len(CTXS), 2), float("nan"))
    out, _ = decode_attention(regions, layout, tables, pos, q, k, v, SCALE, bal, need_mass=False, accumulate=True,
                              new_mass=new_mass, tokens_per_split=16)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(new_mass, mass.gather(2, pos[:, None, None].expand(-1, 2, 1))[..., 0],
                               rtol=1e-4, atol=1e-6)
    assert_pages_match(expected, regions, layout, before=before)
    changed = layout.views(expected).score.view(torch.int32) != layout.views(before).score.view(torch.int32)
    assert changed.sum() >= 8                                  # many slots really accumulated


def test_hi_slot_map_matches_tags():
    config = make_config(2, 0.25, True)
    layout, regions, tables, *_ = build_batch(config, 8, 64, 2, 1, [29, 3], seed=3)
    m = hi_slot_map(regions, layout, tables, torch.tensor([29, 3]), 29)
    r, views = layout.hi_slots, layout.views(regions)
    for i, c in enumerate([29, 3]):
        blocks = tables[i, : -(-c // 8)].long()
        for h in range(2):
            tags = views.tag[blocks, h].reshape(-1)
            want = {int(t) - 1: int(blocks[j // r]) * r + j % r for j, t in enumerate(tags) if 0 < t <= c}
            got = {p: int(s) for p, s in enumerate(m[i, h].tolist()) if s >= 0}
            assert got == want and (len(want) > 0 or c < 8)



def test_step_batches_hold_hi_copies_in_other_blocks():
    """A hi copy sits in the lowest free slot of any block of its row, not in its position's block:
    the decode-step batch of ``test_forward_decode_steps_match_reference`` (cases[1]) holds such
    copies, so a lookup of a position's hi copy among its own block's tags alone fails that test."""
    bits, hi_ratio, group, head_dim, balancer, n = CASES[1]
    ctxs = [21, 0, 15]
    layout, regions, tables, *_ = build_batch(make_config(bits, hi_ratio, balancer), n, head_dim, 2, group, ctxs,
                                              seed=11)
    tags, cross = layout.views(regions).tag, 0
    for i, c in enumerate(ctxs):
        for j in range(-(-c // n)):
            t = tags[int(tables[i, j])].long()                                         # [H, R]
            cross += int(((t > 0) & (t <= c) & ((t - 1) // n != j)).sum())
    assert cross > 0

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_attention_low_precision_queries(dtype):
    """fp16 queries take the fp16 tensor-core dot path, bf16 queries the tf32 path (fp32
    operands: the interpreter computes it in fp32; the GPU rounds operands to 10 mantissa bits,
    benchmarks/gpu_first_contact.sh checks it there); both accumulate in fp32."""
    config = make_config(2, 0.2, True)
    layout, regions, tables, q, k, v = build_batch(config, 16, 64, 2, 4, [40, 7], seed=5)
    bal = stored_balancers(regions, layout, tables, [40, 7])
    exp_out, exp_mass = reference_decode(regions, layout, tables, [40, 7], q.to(dtype).float(), k, v, bal)
    out, mass = decode_attention(regions, layout, tables, torch.tensor([40, 7]), q.to(dtype), k, v, SCALE, bal)
    tol = 2e-2 if dtype == torch.float16 else 6e-2
    torch.testing.assert_close(out, exp_out, rtol=tol, atol=tol)
    torch.testing.assert_close(mass[0, :, :41], exp_mass[0], rtol=tol, atol=tol / 4)


@pytest.mark.parametrize("dtype,q_mul,s_mul", [(torch.float16, 50.0, 1e-3), (torch.bfloat16, 1e5, 1e-8)])
def test_decode_attention_extreme_values_stay_finite(dtype, q_mul, s_mul):
    """Hi copies at the fp16 limit (what core.quant.to_hi clamps a bf16 model's K/V to) and
    queries beyond the fp16 range (bf16): outputs finite and equal to the fp32 reference."""
    config = make_config(2, 0.25, True)
    layout, regions, tables, q, k, v = build_batch(config, 16, 64, 2, 2, [40, 9], seed=6)
    views = layout.views(regions)
    gen = torch.Generator().manual_seed(0)
    for hi in (views.k_hi, views.v_hi):
        hi.copy_(torch.where(torch.rand(hi.shape, generator=gen) < 0.5, 65504.0, -65504.0).half())
    q = (q * q_mul).to(dtype)
    bal = stored_balancers(regions, layout, tables, [40, 9])
    out, _ = decode_attention(regions, layout, tables, torch.tensor([40, 9]), q, k, v, SCALE * s_mul, bal)
    exp_out, _ = reference_decode(regions, layout, tables, [40, 9], q.float() * s_mul, k, v, bal)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, exp_out, rtol=2e-2, atol=65504 * 1e-3)


@pytest.mark.parametrize("bits,hi_ratio,group,head_dim,balancer,block_size", [CASES[0], CASES[4], CASES[1]])
def test_forward_decode_steps_match_reference(bits, hi_ratio, group, head_dim, balancer, block_size):
    """Two full decode steps (store, attention, fused scores, hi maintenance) on a batch."""
    _check_forward_decode_steps(make_config(bits, hi_ratio, balancer), group, head_dim, block_size)


def _check_forward_decode_steps(config, group, head_dim, block_size):
    ctxs = [21, 0, 15]
    layout, regions, tables, q, k, v = build_batch(config, block_size, head_dim, 2, group, ctxs, seed=11)
    expected = regions.clone()
    gen = torch.Generator().manual_seed(2)
    for step in range(2):
        before = expected.clone()
        want = torch.cat([ref.forward_request(expected, layout, config, tables[i], c, q[i:i + 1], k[i:i + 1],
                                              v[i:i + 1], SCALE) for i, c in enumerate(ctxs)])
        got = forward_decode(regions, layout, config, tables, ctxs, q, k, v, SCALE)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert_pages_match(expected, regions, layout, before=before)
        ctxs = [c + 1 for c in ctxs]
        q, k, v = (torch.randn(x.shape, generator=gen) for x in (q, k, v))
    if layout.hi_slots:
        assert (layout.views(regions).tag > 0).any()


def test_forward_request_prefill_and_decode():
    """Drop-in forward_request: dense prefill chunk, then a decode step, pages identical."""
    config = make_config(3, 0.25, True)
    layout, regions, tables, *_ = build_batch(config, 8, 64, 2, 2, [0], seed=7, room=11)
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(11, h, 64, generator=gen) for h in (4, 2, 2))
    row = tables[0]
    expected = regions.clone()
    for start, size in [(0, 9), (9, 1), (10, 1)]:
        sl = slice(start, start + size)
        want = ref.forward_request(expected, layout, config, row, start, q[sl], k[sl], v[sl], SCALE)
        got = forward_request(regions, layout, config, row, start, q[sl], k[sl], v[sl], SCALE)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert_pages_match(expected, regions, layout)


def test_switch_on_cpu(monkeypatch):
    from mikv_vllm.cpu import CpuOps
    from mikv_vllm.kernels import TritonOps

    monkeypatch.delenv("MIKV_VLLM_OPS", raising=False)
    assert not use_triton("cpu") and not use_triton(torch.device("cpu"))
    assert get_ops("cpu") is CpuOps                     # auto: the fused C++ op on CPU
    monkeypatch.setenv("MIKV_VLLM_OPS", "cpu")
    assert get_ops("cpu") is CpuOps
    with pytest.raises(RuntimeError, match="MIKV_VLLM_OPS=cpu"):
        get_ops("cuda")
    monkeypatch.setenv("MIKV_VLLM_OPS", "torch")
    from mikv_vllm.ops.torch_ops import TorchOps
    assert get_ops("cpu") is TorchOps and get_ops("cuda") is TorchOps
    monkeypatch.setenv("MIKV_VLLM_OPS", "triton")      # kernels are interpreted in this process
    assert get_ops("cpu") is TritonOps
    monkeypatch.setenv("MIKV_VLLM_OPS", "Fast")
    with pytest.raises(ValueError, match="MIKV_VLLM_OPS='fast': must be one of"):
        get_ops("cpu")


def test_switch_triton_on_cpu_needs_the_interpreter():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MIKV_VLLM_OPS"] = "triton"
    proc = subprocess.run([sys.executable, "-c", "from mikv_vllm.ops import get_ops; get_ops('cpu')"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "needs TRITON_INTERPRET=1" in proc.stderr, proc.stderr[-2000:]


def test_triton_ops_contract():
    """TritonOps implements the op protocol, with the oracle's signatures for the unplanned calls."""
    import inspect

    from mikv_vllm.kernels import TritonOps
    from mikv_vllm.ops import MiKVOps

    assert isinstance(TritonOps, MiKVOps)
    def params(fn):   # names, kinds and defaults (annotations may differ)
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    for name in ("forward_request", "forward_chunks", "forward_decode"):
        assert params(getattr(TritonOps, name)) == params(getattr(ref, name)), name


def test_unsupported_layout_falls_back_to_the_torch_op_set():
    """head_dim 96 (group 48, not a power of two): the Triton op set serves it with the batched torch
    op set, bit for bit (which the op contract test compares with the oracle)."""
    from mikv_vllm.ops.torch_ops import TorchOps

    config = make_config(2, 0.25, True)
    layout, regions, tables, *_ = build_batch(config, 16, 96, 1, 2, [0], seed=4, room=20)
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(20, h, 96, generator=gen) for h in (2, 1, 1))
    expected = regions.clone()
    for start, size in [(0, 18), (18, 1)]:
        sl = slice(start, start + size)
        want = TorchOps.forward_request(expected, layout, config, tables[0], start, q[sl], k[sl], v[sl], SCALE)
        got = forward_request(regions, layout, config, tables[0], start, q[sl], k[sl], v[sl], SCALE)
        assert torch.equal(got, want) and torch.equal(regions, expected)


def test_fp8_hi_needs_compute_capability_8_9_on_cuda(monkeypatch):
    """fp8 hi copies on a pre-Ada GPU: a clear error naming the alternatives, not a compiler error."""
    from mikv_vllm.core.layout import RegionLayout
    from mikv_vllm.kernels.decode import check_hi_dtype

    fp8 = RegionLayout.build(make_config(3, 0.1, True, hi_dtype="float8_e4m3fn"), 16, 64)
    fp16 = RegionLayout.build(make_config(3, 0.1, True), 16, 64)
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(RuntimeError, match="compute capability >= 8.9.*float16"):
        check_hi_dtype(fp8, cuda)
    check_hi_dtype(fp16, cuda)                       # other hi dtypes: any GPU
    check_hi_dtype(fp8, torch.device("cpu"))         # the interpreter reads fp8
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_hi_dtype(fp8, cuda)
