"""The fused C++ CPU decode step vs the torch reference (the oracle), on garbage-filled pages."""

import math

import pytest
import torch

from mikv_vllm.config import MiKVConfig, preset
from mikv_vllm.core import reference as ref
from mikv_vllm.ops import torch_decode as tdec
from mikv_vllm.core.importance import hi_budget
from mikv_vllm.core.layout import RegionLayout
from mikv_vllm.cpu import CpuOps, decode_step, load

from core._helpers import assert_pages, make_regions, structured_qkv

N = 16
STEPS = 5
PROMPTS = [37, 0, 16, 5, 1, 70]      # multi-block, first token (context 0), block boundary, short

CONFIGS = {
    "mikv": (preset("mikv"), 3, 64),
    "mikv-paper-gqa1": (preset("mikv-paper"), 1, 32),
    "int4-fp32-hi": (MiKVConfig(policy="mikv", lo_bits=4, hi_ratio=0.25, hi_dtype="float32"), 2, 64),
    "int8-bf16-hi-nobal-g8": (MiKVConfig(policy="mikv", lo_bits=8, hi_ratio=0.2, hi_dtype="bfloat16",
                                         balancer=False, group_size=8), 3, 32),
    "int3-group16-all-hi": (MiKVConfig(policy="mikv", lo_bits=3, hi_ratio=1.0, group_size=16), 4, 64),
    "h2o": (preset("h2o"), 3, 64),
    "rtn": (preset("rtn"), 3, 64),
    "int3-fp8-hi-g64": (MiKVConfig(policy="mikv", lo_bits=3, hi_ratio=0.3, group_size=64,
                                   hi_dtype="float8_e4m3fn"), 3, 64),
    "rtn-int4-g64": (preset("rtn-int4").replace(group_size=64), 2, 64),
    "h2o-fp8-hi": (preset("h2o").replace(hi_dtype="float8_e4m3fn"), 2, 64),
    # keys and values at their own widths (the QK and P.V loops dispatch them apart), fp8-scale metadata;
    # fixed shapes (G, D) (3, 64), (4, 64), (2, 128) and runtime ones, groups of 64, 16, 8
    "int4-r03": (preset("mikv-int4-r03"), 3, 64),          # INT4 values, fp16 group metadata
    "k2v4-g16-fp16-hi": (MiKVConfig(policy="mikv", k_bits=2, v_bits=4, hi_ratio=0.25, group_size=16), 4, 64),
    "k8v2-fp8-scale-g8-gqa1": (MiKVConfig(policy="mikv", k_bits=8, v_bits=2, hi_ratio=0.2, group_size=8,
                                          balancer=False, group_meta="fp8-scale"), 1, 32),
    "k3v8-fp8-scale-d128": (MiKVConfig(policy="mikv", k_bits=3, v_bits=8, hi_ratio=0.1,
                                       group_meta="fp8-scale"), 2, 128),
    "rtn-k4v2-fp8-scale": (preset("rtn-int4").replace(v_bits=2, group_meta="fp8-scale"), 2, 64),
}
HKV = 2


def _setup(cfg, group, d, seed=0):
    lay = RegionLayout.build(cfg, N, d)
    num_blocks = 40
    regions = make_regions(lay, num_blocks, HKV, garbage=True, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_blocks, generator=gen)
    rows, used, width = [], 0, 8
    for p in PROMPTS:
        nb = -(-(p + STEPS) // N)
        own = perm[used:used + nb]
        used += nb
        pad = perm[torch.randint(0, num_blocks, (width - nb,), generator=gen)]   # foreign blocks: never touched
        rows.append(torch.cat([own, pad]))
    table = torch.stack(rows).int()
    qkv = [structured_qkv(p + STEPS, group * HKV, HKV, d, seed=seed + i) for i, p in enumerate(PROMPTS)]
    for i, p in enumerate(PROMPTS):
        if p:
            q, k, v = qkv[i]
            ref.forward_request(regions, lay, cfg, table[i], 0, q[:p], k[:p], v[:p], 1 / math.sqrt(d))
    return lay, regions, table, qkv, perm[used:]


def _step(qkv, pos):
    return tuple(torch.stack([qkv[i][j][c] for i, c in enumerate(pos)]) for j in range(3))


def _reference_step(regions, lay, table, pos, q, k, v, scale):
    """The reference decode step without hi maintenance (what the C++ op fuses without ``config``):
    output and the step's mass ``[B, H, S]`` (position-indexed)."""
    b = tdec.decode_balancer(regions, lay, table, pos, q, k)
    blk = table.long().gather(1, (pos // lay.block_size)[:, None])[:, 0]
    ref.store_at(regions, lay, blk, pos % lay.block_size, k, v, b)
    k_ctx, v_ctx, valid = tdec.gather_decode(regions, lay, table, pos, b)
    out, mass = tdec.attention_decode(q, k_ctx, v_ctx, valid, pos, k, v, scale)
    tdec.accumulate_scores_decode(regions, lay, table, pos, mass)
    return out, mass


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_step_matches_reference(name):
    cfg, group, d = CONFIGS[name]
    lay, regions, table, qkv, unused = _setup(cfg, group, d)
    scale = 1 / math.sqrt(d)
    mine, oracle = regions.clone(), regions.clone()
    pos = torch.tensor(PROMPTS)
    q, k, v = _step(qkv, PROMPTS)
    want, _ = _reference_step(oracle, lay, table, pos, q, k, v, scale)
    got = decode_step(mine, lay, table, pos, q, k, v, scale)
    assert got.shape == want.shape and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert_pages(lay, mine, oracle)
    assert torch.equal(mine[unused], regions[unused])


@pytest.mark.parametrize("name", ["mikv", "h2o", "k2v4-g16-fp16-hi", "k8v2-fp8-scale-g8-gqa1"])
def test_decode_split_over_the_context_is_exact(name):
    """One request (HKV tasks: fewer than two per thread) at a context of five segments (2100 tokens;
    kSegTokens = 512 in mikv_decode.cpp, a split from four on): with 2 threads each task's lo context
    is split over the threads, segment by segment. Outputs and page bytes equal the 1-thread run's bit for bit (the
    segments' sums are added in segment order either way) and the oracle's."""
    cfg, group, d = CONFIGS[name]
    lay = RegionLayout.build(cfg, N, d)
    ctx, scale = 2100, 1 / math.sqrt(d)
    nb = -(-(ctx + 1) // N)
    regions = make_regions(lay, nb + 6, HKV, garbage=True, seed=5)
    table = torch.randperm(nb + 6, generator=torch.Generator().manual_seed(5))[:nb].int()[None]
    q, k, v = structured_qkv(ctx + 1, group * HKV, HKV, d, seed=5)
    CpuOps.forward_request(regions, lay, cfg, table[0], 0, q[:ctx], k[:ctx], v[:ctx], scale)
    pos, step = torch.tensor([ctx]), (q[ctx:], k[ctx:], v[ctx:])
    threads = torch.get_num_threads()
    outs, pages = [], []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            pages.append(regions.clone())
            outs.append(decode_step(pages[-1], lay, table, pos, *step, scale))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(pages[0], pages[1])
    oracle = regions.clone()
    want, _ = _reference_step(oracle, lay, table, pos, *step, scale)
    torch.testing.assert_close(outs[1], want, rtol=1e-5, atol=1e-5)
    assert_pages(lay, pages[1], oracle)


@pytest.mark.parametrize("name", ["mikv", "int4-fp32-hi", "h2o", "int3-group16-all-hi", "int3-fp8-hi-g64",
                                  "int4-r03", "k2v4-g16-fp16-hi"])
def test_forward_decode_steps_match_reference(name):
    cfg, group, d = CONFIGS[name]
    lay, regions, table, qkv, unused = _setup(cfg, group, d, seed=1)
    scale = 1 / math.sqrt(d)
    mine, oracle = regions.clone(), regions.clone()
    for step in range(STEPS):
        pos = [p + step for p in PROMPTS]
        q, k, v = _step(qkv, pos)
        want = tdec.forward_decode(oracle, lay, cfg, table, pos, q, k, v, scale)
        got = CpuOps.forward_decode(mine, lay, cfg, table, pos, q, k, v, scale)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(lay.views(mine).tag, lay.views(oracle).tag), step    # same hi sets and slots
        assert_pages(lay, mine, oracle, f"step {step}")
    assert torch.equal(mine[unused], regions[unused])


@pytest.mark.parametrize("name", ["mikv", "int4-fp32-hi", "int3-group16-all-hi", "k8v2-fp8-scale-g8-gqa1"])
def test_shared_rows_match_reference(name):
    """Rows reading shared prefix blocks (own_from > 0): request 0 reads request 5's first two
    blocks (as after a prefix-cache hit) while request 5 keeps writing them."""
    cfg, group, d = CONFIGS[name]
    lay, regions, table, qkv, unused = _setup(cfg, group, d, seed=2)
    table[0, :2] = table[5, :2]
    own_from = [2, 0, 0, 0, 0, 0]
    scale = 1 / math.sqrt(d)
    mine, oracle = regions.clone(), regions.clone()
    for step in range(STEPS):
        pos = [p + step for p in PROMPTS]
        q, k, v = _step(qkv, pos)
        want = tdec.forward_decode(oracle, lay, cfg, table, pos, q, k, v, scale, own_from)
        got = CpuOps.forward_decode(mine, lay, cfg, table, pos, q, k, v, scale, own_from)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(lay.views(mine).tag, lay.views(oracle).tag), step
        assert_pages(lay, mine, oracle, f"step {step}")
    plain, shared = regions.clone(), regions.clone()   # the check can fail: without own_from, row 0 adds
    CpuOps.forward_decode(plain, lay, cfg, table, PROMPTS, *_step(qkv, PROMPTS), scale)   # its scores there
    CpuOps.forward_decode(shared, lay, cfg, table, PROMPTS, *_step(qkv, PROMPTS), scale, own_from)
    assert not torch.equal(plain[table[5, :2].long()], shared[table[5, :2].long()])
    with pytest.raises(RuntimeError, match="own_from"):
        decode_step(regions, lay, table, torch.tensor(PROMPTS), *_step(qkv, PROMPTS), scale,
                    own_from=torch.tensor([3, 0, 0, 0, 0, 0]), shared_hi=torch.zeros(6, dtype=torch.int64))


def test_bad_block_table_raises():
    cfg, group, d = CONFIGS["mikv"]
    lay, regions, table, qkv, _ = _setup(cfg, group, d)
    q, k, v = _step(qkv, PROMPTS)
    bad = table.clone()
    bad[0, 0] = regions.shape[0]
    with pytest.raises(RuntimeError, match="out of range"):
        decode_step(regions, lay, bad, torch.tensor(PROMPTS), q, k, v, 0.1)


def test_build_failure_raises_with_compiler_error(tmp_path, monkeypatch):
    from mikv_vllm.cpu import CpuOpBuildError, build

    bad = tmp_path / "broken.cpp"
    bad.write_text("this is not C++;\n")
    monkeypatch.setattr(build, "SOURCES", [bad])
    monkeypatch.setattr(build, "_ACTIVE", None)
    monkeypatch.setenv(build.BUILD_DIR_ENV, str(tmp_path / "ext"))
    with pytest.raises(CpuOpBuildError, match="MIKV_VLLM_OPS=torch") as info:
        build.load()
    assert "broken.cpp" in str(info.value) and "error" in str(info.value)    # the compiler's message


def test_hi_roundtrip_fp8_matches_torch():
    """C++ store_hi/load_hi for fp8 e4m3fn = core.quant.to_hi (clamp to +-448, round to nearest even)
    bit for bit: every fp8 value, midpoints between neighbours (ties), beyond-range values, NaN."""
    from mikv_vllm.core.quant import to_hi

    every = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    finite = every[torch.isfinite(every)].unique()
    mids = (finite[1:] + finite[:-1]) / 2
    x = torch.cat([finite, mids, torch.tensor([448.5, 470.0, 480.0, 1e6, -1e6, float("inf"), -float("inf"),
                                               float("nan"), 1e-9, -1e-9]),
                   torch.randn(2000, generator=torch.Generator().manual_seed(0)) * 50])
    x = x[: x.numel() // 8 * 8].reshape(-1, 8)
    raw, back = load().hi_roundtrip(x.contiguous(), 3)
    want = to_hi(x, torch.float8_e4m3fn)
    assert torch.equal(raw, want.view(torch.uint8))
    torch.testing.assert_close(back, want.float(), rtol=0, atol=0, equal_nan=True)
    for code, dt in ((0, torch.float16), (1, torch.bfloat16)):   # the other hi dtypes keep their conversions
        y = torch.randn(4, 8)
        torch.testing.assert_close(load().hi_roundtrip(y, code)[1], y.to(dt).float(), rtol=0, atol=0)


# ------------------------------------------------------------------ hi-set upkeep in the C++ step
# The C++ step's upkeep vs tdec.maintain_hi_decode over hundreds of decode steps. The scores
# of both sides agree to fp32 rounding only (summation order), so each step the reference takes the
# C++ op's state before its upkeep (the same step run without upkeep: store, attention, slot scores,
# checked against the reference's first) and the C++ mass of the new token (the score of the slot it
# was promoted to, checked against the reference's mass): tags, hi copies and scores must then
# match byte for byte after the upkeep.

def _upkeep_setup(cfg, prompts, steps, d=32, group=2, block=N, seed=0, spare=0):
    lay = RegionLayout.build(cfg, block, d)
    per_req = [-(-(p + steps) // block) for p in prompts]
    num_blocks = sum(per_req) + spare
    regions = make_regions(lay, num_blocks, HKV, garbage=True, seed=seed)
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
    width = max(per_req) + 1
    table = perm[torch.randint(0, num_blocks, (len(prompts), width), generator=torch.Generator().manual_seed(seed))]
    used = 0
    for i, nb in enumerate(per_req):
        table[i, :nb] = perm[used:used + nb]
        used += nb
    qkv = [structured_qkv(p + steps, group * HKV, HKV, d, seed=seed + i) for i, p in enumerate(prompts)]
    for i, p in enumerate(prompts):
        if p:
            q, k, v = qkv[i]
            ref.forward_request(regions, lay, cfg, table[i], 0, q[:p], k[:p], v[:p], 1 / math.sqrt(d))
    return lay, regions, table.int(), qkv, perm[used:]


def _promoted_mass(lay, pages, table, pos, mass):
    """``mass [B, H, S]`` with column ``pos[b]`` replaced by the score of the slot the C++ op promoted
    request b's new token to (head by head, where it did), after checking it against the reference's
    value: the C++ op's own mass of the new token, so that both sides select with the same numbers."""
    views, r = lay.views(pages), lay.hi_slots
    mass = mass.clone()
    for b, p in enumerate(pos.tolist()):
        blocks = table[b, : p // lay.block_size + 1].long()
        tags = views.tag[blocks].transpose(0, 1).reshape(pages.shape[1], -1)               # [H, S]
        scores = views.score[blocks].transpose(0, 1).reshape(pages.shape[1], -1)
        hh, slot = torch.nonzero(tags == p + 1, as_tuple=True)
        got, want = scores[hh, slot], mass[b, hh, p]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"promoted slot score: {m}")
        mass[b, hh, p] = got
    return mass


def _upkeep_steps(cfg, lay, regions, table, qkv, prompts, steps, d=32, plant=None, out_atol=1e-4, on_step=None):
    """Run ``steps`` decode steps on both sides; ``plant(pages, step, pos)`` edits both pages before a
    step, ``on_step(step, pos, before, after)`` sees the reference's pages around each upkeep."""
    scale = 1 / math.sqrt(d)
    mine, oracle = regions.clone(), regions.clone()
    for step in range(steps):
        pos = [p + step for p in prompts]
        if plant is not None:
            plant(mine, step, pos)
            plant(oracle, step, pos)
        q, k, v = _step(qkv, pos)
        pt = torch.tensor(pos)
        scored = mine.clone()            # the C++ step without upkeep: the state its upkeep starts from
        decode_step(scored, lay, table, pt, q, k, v, scale)
        got = CpuOps.forward_decode(mine, lay, cfg, table, pos, q, k, v, scale)
        want, mass = _reference_step(oracle, lay, table, pt, q, k, v, scale)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=out_atol)     # fp32 rounding over long contexts
        assert_pages(lay, scored, oracle, f"step {step}, before the upkeep")   # scores in the right slots
        if lay.hi_slots:
            oracle.copy_(scored)
            before = oracle.clone()
            tdec.maintain_hi_decode(oracle, lay, cfg, table, pt, k, v, _promoted_mass(lay, mine, table, pt, mass))
            if on_step is not None:
                on_step(step, pos, before, oracle)
        diff = (mine != oracle).nonzero()
        assert diff.numel() == 0, f"step {step}: {diff.shape[0]} bytes differ, first at {diff[:3].tolist()}"
    return mine


def _hi_sets(lay, regions, table, lengths):
    """[request][head] -> sorted hi positions."""
    views = lay.views(regions)
    out = []
    for row, length in zip(table, lengths):
        nb = -(-length // lay.block_size)
        tags = views.tag[row[:nb].long()].transpose(0, 1).reshape(regions.shape[1], -1)
        out.append([sorted((t[t > 0] - 1).tolist()) for t in tags])
    return out


UPKEEP = {   # name: (config, d, query group, block size, decode steps)
    "mikv": (preset("mikv"), 64, 3, N, 200),               # r = 0.03: fewer slots per block than the 4 sinks
    "mikv-paper": (preset("mikv-paper"), 32, 1, N, 300),
    "recent-window-5": (MiKVConfig(policy="mikv", lo_bits=4, hi_ratio=0.25, recent_window=5, hi_dtype="float32"),
                        32, 2, N, 200),
    "few-slots-many-sinks": (MiKVConfig(policy="mikv", lo_bits=2, hi_ratio=0.1, sink_tokens=6), 32, 2, 8, 200),
    "bf16-no-sinks": (MiKVConfig(policy="mikv", lo_bits=8, hi_ratio=0.3, sink_tokens=0, hi_dtype="bfloat16",
                                 balancer=False, group_size=8), 32, 2, N, 150),   # budget 0 while L < 4
    "h2o": (preset("h2o"), 32, 2, N, 200),
    "rtn": (preset("rtn"), 32, 2, N, 30),                  # no hi slots: nothing to keep
}
UPKEEP_PROMPTS = [0, 3, 16, 41]     # context 0, sinks at a short prompt, a block boundary, multi-block


@pytest.mark.parametrize("name", list(UPKEEP))
def test_upkeep_matches_reference_over_many_steps(name):
    cfg, d, group, block, steps = UPKEEP[name]
    lay, regions, table, qkv, unused = _upkeep_setup(cfg, UPKEEP_PROMPTS, steps, d=d, group=group, block=block)
    mine = _upkeep_steps(cfg, lay, regions, table, qkv, UPKEEP_PROMPTS, steps, d=d)
    assert torch.equal(mine[unused], regions[unused])
    if not lay.hi_slots:
        return
    lengths = [p + steps for p in UPKEEP_PROMPTS]
    for heads, length in zip(_hi_sets(lay, mine, table, lengths), lengths):
        budget = hi_budget(cfg, length, -(-length // block) * lay.hi_slots)
        for hi in heads:       # budget grew to its final value; sinks pinned; the newest token is recent
            sinks = [p for p in hi if p < cfg.sink_tokens]
            assert len(hi) == budget and hi[-1] == length - 1, (length, hi[-8:])
            assert sinks == list(range(len(sinks))) and len(sinks) >= min(1, cfg.sink_tokens), hi[:8]
            if lay.hi_slots >= cfg.sink_tokens:      # no slot shortage at the first tokens: all sinks kept
                assert len(sinks) == cfg.sink_tokens, hi[:8]


def test_upkeep_stale_tags_and_ties_take_the_full_selection():
    """Reused blocks with stale tags: planted tags in (0, pos] beyond the budget (several losers in
    one step), duplicate positions, tags past the context, and saturated / NaN / negative slot scores."""
    cfg = preset("mikv-paper")
    prompts, steps = [20, 33, 50], 120
    lay, regions, table, qkv, _ = _upkeep_setup(cfg, prompts, steps, seed=3)
    views_r = lay.hi_slots

    def plant(pages, step, pos):
        if step % 10:
            return
        views = lay.views(pages)
        g = torch.Generator().manual_seed(1000 + step)       # same plant on both sides
        for i, p in enumerate(pos):
            nb = p // lay.block_size + 1
            blocks = table[i, :nb].long()
            slots = torch.randperm(nb * views_r, generator=g)[: max(1, nb * views_r // 2)]
            tags = views.tag[blocks]
            free = torch.ones(p + 1, dtype=torch.bool)
            free[tags[(tags > 0) & (tags <= p)].long()] = False    # no second copy of a tagged token's
            free[0] = False                                         # position (attention would pick one)
            pool = free.nonzero()[:, 0]
            vals = pool[torch.randint(0, pool.numel(), (slots.numel(),), generator=g)].int()
            vals[0] = p + 5                                   # stale: past the context
            if slots.numel() > 2:
                vals[2] = vals[1]                             # the same position in two slots
            blk, rr = blocks[slots // views_r], slots % views_r
            views.tag[blk, :, rr] = vals[:, None]
            views.k_hi[blk, :, rr] = 0     # finite hi copies
            views.v_hi[blk, :, rr] = 0
            kinds = torch.tensor([torch.finfo(torch.float32).max, float("nan"), -3.0])   # the planted slots'
            views.score[blk, :, rr] = kinds[torch.randint(0, 3, (slots.numel(), pages.shape[1]), generator=g)]

    _upkeep_steps(cfg, lay, regions, table, qkv, prompts, steps, plant=plant)


def test_upkeep_keeps_a_planted_heavy_hitter():
    """A key every later query aligns with stays hi in the C++ pages (neither sink nor recent)."""
    cfg = MiKVConfig(policy="mikv", lo_bits=3, hi_ratio=0.1, sink_tokens=4)
    d, steps, prompt, needle = 64, 150, 200, 100
    lay, regions, table, _, _ = _upkeep_setup(cfg, [0], prompt + steps, d=d, group=3)
    q, k, v = structured_qkv(prompt + steps, 3 * HKV, HKV, d, seed=1)
    u = torch.randn(d, generator=torch.Generator().manual_seed(1))
    u = u / u.norm()
    q += 2.0 * u
    k[needle] = 40.0 * u
    ref.forward_request(regions, lay, cfg, table[0], 0, q[:prompt], k[:prompt], v[:prompt], 1 / math.sqrt(d))
    mine = _upkeep_steps(cfg, lay, regions, table, [(q, k, v)], [prompt], steps, d=d)
    for hi in _hi_sets(lay, mine, table, [prompt + steps])[0]:
        assert needle in hi and needle < prompt + steps - len(hi) // 2


def test_upkeep_hi_copy_is_clamped_like_to_hi():
    """K/V beyond fp16's range: the hi copies hold +-65504 (quant.to_hi), byte-equal to the reference."""
    cfg = preset("mikv-paper")
    prompts, steps = [5, 20], 40
    lay, regions, table, qkv, _ = _upkeep_setup(cfg, prompts, steps, seed=5)
    for q, k, v in qkv:       # huge keys in the first quantization group, which the queries ignore
        q[:, :, :lay.group] = 0
        k[::3, :, :lay.group] *= 1e5
        v[::2, :, -4:] *= 3e5
    mine = _upkeep_steps(cfg, lay, regions, table, qkv, prompts, steps, out_atol=0.1)   # |V| up to 3e5
    views = lay.views(mine)
    live = table[:, :2].long().flatten()
    tagged = views.tag[live] > 0                                         # [blocks, H, R]
    k_hi, v_hi = views.k_hi[live][tagged].float(), views.v_hi[live][tagged].float()
    assert torch.isfinite(k_hi).all() and torch.isfinite(v_hi).all()
    assert (k_hi.abs() == 65504).any() and (v_hi.abs() == 65504).any()


HEAVY = {   # r = 0.3, 2 sinks: most of the hi set is heavy hitters, one loser per step
    # the token leaving the window (1) competes with the heavy hitters by the score its slot got at
    # promotion plus this step's mass
    "window-1": MiKVConfig(policy="mikv", lo_bits=3, hi_ratio=0.3, sink_tokens=2, recent_window=1),
    # no window: the new token competes by its mass of this step
    "window-0": MiKVConfig(policy="mikv", lo_bits=3, hi_ratio=0.3, sink_tokens=2, recent_window=0),
}


@pytest.mark.parametrize("name", list(HEAVY))
def test_upkeep_demotes_by_slot_score_order(name):
    """Heavy-hitter selection over many decode steps where the order of the slot scores decides which
    token is demoted (not the positions): the C++ op must add each hi token's mass to its own slot's
    score and give a promoted slot its token's mass, or its pages leave the reference's. The
    reference's demotions are checked to depend on the scores: a younger heavy hitter is demoted
    while an older one stays, the loser holding the lowest score of the heavy tier."""
    cfg = HEAVY[name]
    prompts, steps, d = [0, 9, 40], 160, 32
    lay, regions, table, qkv, _ = _upkeep_setup(cfg, prompts, steps, d=d, seed=7)
    for q, k, v in qkv:       # a few keys the later queries align with: clear heavy hitters among noise
        u = torch.randn(d, generator=torch.Generator().manual_seed(7))
        q += 1.5 * u / u.norm()
        k[5::23] += 12.0 * u / u.norm()
    r, n = lay.hi_slots, lay.block_size
    seen = {"by score": 0, "new token lost": 0, "new token won": 0}

    def on_step(step, pos, before, after):
        bv, av = lay.views(before), lay.views(after)
        for b, p in enumerate(pos):
            blocks = table[b, : p // n + 1].long()
            length = p + 1
            budget = hi_budget(cfg, length, blocks.numel() * r)
            recent_from = length - cfg.recent_window
            for h in range(regions.shape[1]):
                t0, t1 = bv.tag[blocks, h].reshape(-1), av.tag[blocks, h].reshape(-1)
                sc = bv.score[blocks, h].reshape(-1)
                live = (t0 > 0) & (t0 <= p)
                heavy = live & (t0 - 1 >= cfg.sink_tokens) & (t0 - 1 < recent_from)
                lost = heavy & (t1 != t0)
                kept = heavy & (t1 == t0)
                if lost.any() and kept.any():
                    assert sc[lost].max() <= sc[kept].min()        # the lowest scores go
                    if (t0[lost].min() > t0[kept].min()).item():
                        seen["by score"] += 1                      # an older heavy hitter outlived it
                if cfg.recent_window == 0 and int(live.sum()) == budget and p >= cfg.sink_tokens:
                    seen["new token won" if (t1 == p + 1).any() else "new token lost"] += 1

    _upkeep_steps(cfg, lay, regions, table, qkv, prompts, steps, d=d, on_step=on_step)
    assert seen["by score"] >= 20, seen
    if cfg.recent_window == 0:
        assert seen["new token won"] >= 5 and seen["new token lost"] >= 5, seen
