"""The Triton path's temporaries stay within the stated workspace (measured, not assumed).

Peaks are measured with tests/kernels/_memtrack.PeakTracker (every tensor the code allocates,
interpreter argument copies excluded) on CPU under the interpreter.
"""

import pytest
import torch

from mikv_vllm.config import MiKVConfig
from mikv_vllm.core import reference as ref
from mikv_vllm.ops import torch_decode as tdec
from mikv_vllm.core.importance import hi_budget
from mikv_vllm.core.layout import RegionLayout
from mikv_vllm.kernels import step
from mikv_vllm.kernels import workspace as ws
from mikv_vllm.kernels.ops import TritonOps, chunked_attention, forward_request
from mikv_vllm.ops.plan import StepPlan, plan_for

from ._memtrack import PeakTracker
from ._util import SCALE, assert_pages_match, build_batch, make_config

CPU = torch.device("cpu")


def synthetic(config, ctxs, hkv, d, n=16, seed=0):
    """Pages as after a long run, without running prefill: random lo codes with sane (scale,
    zero), the hi budget of random positions tagged per (request, head), random scores."""
    g = torch.Generator().manual_seed(seed)
    layout = RegionLayout.build(config, n, d)
    nbs = [c // n + 1 for c in ctxs]
    regions = torch.randint(0, 256, (sum(nbs), hkv, layout.region_bytes), dtype=torch.uint8, generator=g)
    views = layout.views(regions)
    if layout.bits:
        for sz in (views.k_sz, views.v_sz):
            sz[..., 0].uniform_(0.01, 0.1, generator=g)
            sz[..., 1].uniform_(-0.3, -0.1, generator=g)
    if layout.has_balancer:
        views.balancer.uniform_(0.5, 2.0, generator=g)
    tables = torch.zeros(len(ctxs), max(nbs), dtype=torch.int32)
    perm = torch.randperm(sum(nbs), generator=g).to(torch.int32)
    r, start = layout.hi_slots, 0
    if r:
        views.score.uniform_(0, 1, generator=g)
        views.k_hi.normal_(generator=g), views.v_hi.normal_(generator=g)
        views.tag.zero_()
    for i, c in enumerate(ctxs):
        tables[i, : nbs[i]] = perm[start: start + nbs[i]]
        start += nbs[i]
        if r and c:
            budget = hi_budget(config, c, nbs[i] * r)
            tags = torch.zeros(hkv, nbs[i] * r, dtype=torch.int32)
            for h in range(hkv):
                tags[h, :budget] = torch.randperm(c, generator=g)[:budget].int() + 1
            views.tag[tables[i, : nbs[i]].long()] = tags.view(hkv, nbs[i], r).transpose(0, 1)
    return layout, regions, tables


def _next_token(batch, hq, hkv, d, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, x, d, generator=g) for x in (hq, hkv, hkv))


def test_decode_step_allocates_nothing_per_call():
    """The decode step's buffers are made once (``TritonOps.prepare``, sized by the plan's bounds);
    a layer's call then allocates no tensor: one 4k-token request among 64 short ones; outputs and
    pages equal the torch reference."""
    config = MiKVConfig(policy="mikv", lo_bits=3, hi_ratio=0.1)
    gen = torch.Generator().manual_seed(1)
    ctxs = [4096] + torch.randint(1, 64, (64,), generator=gen).tolist()
    hq, hkv, d = 2, 1, 16
    layout, regions, tables = synthetic(config, ctxs, hkv, d)
    q, k, v = _next_token(len(ctxs), hq, hkv, d)
    expected = regions.clone()
    plan = plan_for(config, layout, tables, ctxs)
    TritonOps.prepare(StepPlan(decode=plan), layout, config, hq, hkv)
    step._views(regions, layout)     # a layer's page views: made at its first call (two scalar dtype probes)
    with PeakTracker() as tracker:
        out = TritonOps.decode(regions, layout, config, plan, q, k, v, SCALE)
    assert tracker.peak == 0, tracker.peak
    want = tdec.forward_decode(expected, layout, config, tables, ctxs, q, k, v, SCALE)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    assert_pages_match(expected, regions, layout)


def test_groups_split_by_length():
    config = MiKVConfig(policy="mikv", lo_bits=3, hi_ratio=0.1)
    dims = ws.Dims(32, 8, RegionLayout.build(config, 16, 128))

    def splits_for(n, c):
        return 1

    ctxs = [131072] + [1000] * 256
    groups = ws.plan_decode_groups(dims, ctxs, 256 << 20, splits_for)
    assert [0] in groups and sorted(i for g in groups for i in g) == list(range(257))
    assert all(ws.decode_group_bytes(dims, len(g), max(ctxs[i] for i in g), 1) + ws.decode_output_bytes(dims, 257)
               <= 256 << 20 for g in groups)
    assert len(ws.plan_decode_groups(dims, [1000] * 64, 256 << 20, splits_for)) == 1
    with pytest.raises(ws.WorkspaceTooSmall, match="MIKV_VLLM_WORKSPACE_MB"):
        ws.plan_decode_groups(dims, ctxs, 8 << 20, splits_for)


# (lo bits, hi ratio, scorer, GQA group, head_dim, block size, ctx, chunk tokens)
PREFILL_CASES = [
    (3, 0.25, "accumulated", 2, 64, 16, 61, 9),
    (2, 0.2, "window", 4, 64, 8, 100, 40),
    (0, 0.5, "accumulated", 1, 64, 16, 45, 20),
    (4, 0.0, "accumulated", 3, 32, 16, 33, 17),
]


@pytest.mark.parametrize("bits,r,scorer,group,d,n,ctx,t", PREFILL_CASES)
def test_chunked_attention_matches_reference(bits, r, scorer, group, d, n, ctx, t):
    """Key chunks of one block and query rows in small blocks (a tiny workspace) give the dense
    reference's outputs and score mass; the chunk's own keys are causal."""
    config = make_config(bits, r, bits > 0)
    if scorer == "window":
        config = MiKVConfig(**{**config.__dict__, "scorer": "window", "obs_window": 7})
    layout, regions, tables, *_ = build_batch(config, n, d, 2, group, [ctx], seed=bits + 3, room=t + 1)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(t, x, d, generator=gen) for x in (2 * group, 2, 2))
    row = tables[0]
    bal = ref.load_balancer(regions, layout, row) if layout.has_balancer else None
    ref.write_tokens(regions, layout, row, ctx, k, v, bal)
    vote = ref.first_voting_row(config, t) if layout.hi_slots else None
    kc, vc, ok = ref.gather_context(regions, layout, row, ctx, bal)
    want, want_mass = ref.attention(q, kc, vc, ok, k, v, SCALE, vote)
    dims = ws.Dims(2 * group, 2, layout)
    budget = ws.prefill_fixed_bytes(dims, t, ctx) + ws.prefill_tile_bytes(dims, 4, n)
    rows, chunk = ws.plan_prefill(dims, t, ctx, budget)
    assert rows < t and chunk < ctx                                         # really tiled
    out, mass = chunked_attention(regions, layout, row, ctx, q, k, v, SCALE, bal, vote, workspace=budget)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    if vote is None:
        assert mass is None
    else:
        torch.testing.assert_close(mass, want_mass, rtol=1e-4, atol=1e-6)


def test_prefill_peak_within_workspace(monkeypatch):
    """A 64-token chunk at context 20k: forward_request holds at most the workspace, and the
    pages equal the reference's."""
    config = MiKVConfig(policy="mikv", lo_bits=2, hi_ratio=0.2)
    ctx, t, hq, hkv, d = 20000, 64, 4, 2, 32
    layout, regions, tables = synthetic(config, [ctx + t], hkv, d)
    row = tables[0]
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(t, x, d, generator=gen) for x in (hq, hkv, hkv))
    budget = 4 << 20
    dims = ws.Dims(hq, hkv, layout)
    assert ws.plan_prefill(dims, t, ctx, budget)[1] < ctx                   # really chunked
    expected = regions.clone()
    want = ref.forward_request(expected, layout, config, row, ctx, q, k, v, SCALE)
    monkeypatch.setenv(ws.WORKSPACE_ENV, "4")
    with PeakTracker() as tracker:
        got = forward_request(regions, layout, config, row, ctx, q, k, v, SCALE)
    print(f"prefill peak {tracker.peak / 2**20:.2f} MiB, workspace {budget >> 20} MiB")
    assert 0 < tracker.peak <= budget
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert_pages_match(expected, regions, layout)


def test_workspace_env(monkeypatch):
    monkeypatch.delenv(ws.WORKSPACE_ENV, raising=False)
    assert ws.workspace_bytes() == ws.DEFAULT_WORKSPACE_MB << 20
    monkeypatch.setenv(ws.WORKSPACE_ENV, "64")
    assert ws.workspace_bytes() == 64 << 20
    for bad in ("0", "-3", "lots", "1.5"):
        monkeypatch.setenv(ws.WORKSPACE_ENV, bad)
        with pytest.raises(ValueError, match=ws.WORKSPACE_ENV):
            ws.workspace_bytes()


def test_required_workspace_fits_the_default_for_common_models():
    """The default workspace covers a 128k-token request of 8B / 70B-class models (32 or 64 q
    heads, 8 kv heads, head_dim 128) with 8192-token prefill chunks; a 2M-token context needs
    more, and the planners say so instead of overrunning."""
    layout = RegionLayout.build(MiKVConfig(policy="mikv", lo_bits=3, hi_ratio=0.1), 16, 128)
    default = ws.DEFAULT_WORKSPACE_MB << 20
    for hq in (32, 64):
        dims = ws.Dims(hq, 8, layout)
        assert ws.required_workspace(dims, 131072, 8192) <= default
        rows, chunk = ws.plan_prefill(dims, 8192, 131072 - 8192, default)
        assert rows >= 256 and chunk >= 256
        assert ws.required_workspace(dims, 1 << 21, 8192) > default
        with pytest.raises(ws.WorkspaceTooSmall, match=ws.WORKSPACE_ENV):
            ws.plan_decode_groups(dims, [1 << 21], default, lambda n, c: 64)
        assert ws.check_workspace(dims, 131072, 8192, default) == default
        with pytest.raises(ws.WorkspaceTooSmall, match=r"needs a \d+ MiB workspace"):
            ws.check_workspace(dims, 1 << 21, 8192, default)


def test_reserve_workspace_allocates_the_budget():
    with PeakTracker() as tracker:
        assert ws.reserve_workspace("cpu", 3 << 20) == 3 << 20
    assert tracker.peak == 3 << 20 and tracker.live == 0
