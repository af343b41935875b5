"""The Hadamard rotation folded into the Triton decode step (``TritonOps.decode_rotated``,
kernels/rotate.py) against the backend's semantics (``OpSet.decode_rotated``: q / k / v rotated in
torch, decoded, the output rotated back)."""

from __future__ import annotations

import pytest
import torch

from mikv_vllm.config import preset
from mikv_vllm.core import reference as ref
from mikv_vllm.core.layout import RegionLayout
from mikv_vllm.core.rotation import rotation_for
from mikv_vllm.kernels import TritonOps
from mikv_vllm.kernels.step import DecodeBuffers, decode_buffer_bytes
from mikv_vllm.ops.plan import StepPlan, plan_for

from ._util import SCALE, assert_pages_match, build_batch

CONFIGS = {
    "mikv-int3-r05": lambda: preset("mikv-int3-r05"),                        # fp8 hi, no balancer
    "mikv-rot-bal-k4v3-fp8-scale": lambda: preset("mikv-int4-r03").replace(rotation=True, v_bits=3, group_meta="fp8-scale"),
    "h2o-rot": lambda: preset("h2o").replace(rotation=True),                 # no lo tier
}


def _step(ops_decode, regions, layout, cfg, tables, pos, q, k, v):
    plan = plan_for(cfg, layout, tables, pos)
    TritonOps.prepare(StepPlan(decode=plan), layout, cfg, q.shape[1], k.shape[1])
    return ops_decode(regions, layout, cfg, plan, q, k, v, SCALE, rotation_for(layout.head_dim)).clone()


def _exact(shape, gen, dtype):
    """Multiples of 1/4 in [-4, 4]: at head_dim 64 (R = +-1/8) every rotated value is an exact fp32
    sum, so torch's matmul and the kernels' dot agree bit for bit."""
    return (torch.randint(-16, 17, shape, generator=gen) / 4).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fused_rotation_equals_rotating_around_the_kernels(name, dtype):
    """Same page bytes (scores included: the same kernels run on the same values) and outputs as the
    unfused path, over decode steps with a first token (the balancer from the rotated q) and, in
    the second step, a row with NaN and inf in q, k and v."""
    cfg = CONFIGS[name]()
    ctxs = [21, 0, 15]
    layout, regions, tables, *_ = build_batch(cfg, 16, 64, 2, 3, ctxs, seed=5, room=4)
    fused, unfused = regions.clone(), regions.clone()
    gen = torch.Generator().manual_seed(7)
    for step in range(3):
        q, k, v = (_exact((3, h, 64), gen, dtype) for h in (6, 2, 2))
        if step == 1:
            for x in (q, k, v):
                x[1, 0, 3], x[1, -1, 5], x[1, -1, 9] = float("nan"), float("inf"), -float("inf")
        got = _step(TritonOps.decode_rotated, fused, layout, cfg, tables, ctxs, q, k, v)
        want = _step(super(TritonOps, TritonOps).decode_rotated, unfused, layout, cfg, tables, ctxs, q, k, v)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(fused, unfused)
        ctxs = [c + 1 for c in ctxs]


@pytest.mark.parametrize("head_dim", [64, 128])
def test_fused_rotation_matches_the_oracle(head_dim):
    """Random fp32 q / k / v: the kernels' rotated copies (left in the step's buffers) are
    ``Rotation.rotate``'s to fp32 rounding, and outputs and page bytes are the oracle's run on
    those copies (``reference.forward_decode``), the output rotated back."""
    cfg = CONFIGS["mikv-rot-bal-k4v3-fp8-scale"]()
    ctxs = [30, 0, 9]
    layout, regions, tables, *_ = build_batch(cfg, 16, head_dim, 2, 2, ctxs, seed=3, room=3)
    rot = rotation_for(head_dim)
    mine, oracle = regions.clone(), regions.clone()
    gen = torch.Generator().manual_seed(11)
    for _ in range(2):
        q, k, v = (torch.randn(3, h, head_dim, generator=gen) for h in (4, 2, 2))
        before = oracle.clone()
        plan = plan_for(cfg, layout, tables, ctxs)
        TritonOps.prepare(StepPlan(decode=plan), layout, cfg, 4, 2)
        got = TritonOps.decode_rotated(mine, layout, cfg, plan, q, k, v, SCALE, rot).clone()
        buf = plan.state["triton_decode"]
        rotated = buf.qr[:3], buf.kr[:3], buf.vr[:3]
        for x, xr in zip((q, k, v), rotated):
            torch.testing.assert_close(xr, rot.rotate(x), rtol=1e-5, atol=1e-6)
        want = rot.unrotate(ref.forward_decode(oracle, layout, cfg, tables, ctxs, *rotated, SCALE))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert_pages_match(oracle, mine, layout, before=before)
        ctxs = [c + 1 for c in ctxs]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rotated_copies_are_rounded_to_the_input_dtype(dtype):
    """``Rotation.rotate`` returns the input dtype: the kernels' rotated copies are values of that
    dtype (nearest to the fp32 product), equal to torch's but where fp32 sums in another order
    round across a tie."""
    cfg = CONFIGS["mikv-int3-r05"]()
    layout, regions, tables, *_ = build_batch(cfg, 16, 64, 2, 3, [12, 0], seed=4)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, h, 64, generator=gen).to(dtype) for h in (6, 2, 2))
    plan = plan_for(cfg, layout, tables, [12, 0])
    TritonOps.prepare(StepPlan(decode=plan), layout, cfg, 6, 2)
    TritonOps.decode_rotated(regions, layout, cfg, plan, q, k, v, SCALE, rotation_for(64))
    buf = plan.state["triton_decode"]
    for x, xr in zip((q, k, v), (buf.qr[:2], buf.kr[:2], buf.vr[:2])):
        assert torch.equal(xr.to(dtype).float(), xr)               # a value of the input dtype
        want = rotation_for(64).rotate(x)
        assert (xr.to(dtype) == want).float().mean() > 0.99
        torch.testing.assert_close(xr.to(dtype), want)


def test_unrotated_buffers_refuse_a_rotated_decode():
    cfg = preset("mikv")
    layout, regions, tables, q, k, v = build_batch(cfg, 16, 64, 2, 2, [5], seed=1)
    with pytest.raises(ValueError, match="rotat"):
        _step(TritonOps.decode_rotated, regions, layout, cfg, tables, [5], q, k, v)



def test_decode_buffer_bytes_cover_the_rotation_buffers():
    """The engine's reservation (``decode_buffer_bytes``) counts the matrix and the rotated copies."""
    layout = RegionLayout.build(preset("mikv-int3-r05"), 16, 64)
    buf = DecodeBuffers.make(layout, 6, 2, rows=5, max_pos=64, device="cpu", rotation=True)
    nbytes = {name: t.numel() * t.element_size() for name, t in vars(buf).items() if isinstance(t, torch.Tensor)}
    with_rot, without = (decode_buffer_bytes(6, 2, 64, 5, 64, True, rotation=r) for r in (True, False))
    assert sum(nbytes.values()) <= with_rot
    assert sum(nbytes[name] for name in ("rot", "qr", "kr", "vr")) <= with_rot - without
