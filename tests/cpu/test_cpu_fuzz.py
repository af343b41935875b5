"""Property-based checks of the fused C++ ops on random page states (issue 28).

* Valid states: random configs and shapes, garbage-filled pages, requests with random contexts
  (partially filled blocks, context 0 too) prefilled by the oracle in random chunks, a reader sharing
  a writer's first blocks (prefix caching: ``own_from``), and planted stale state as reused blocks
  leave it: tags past the context, negative tags, a position in two slots, saturated / NaN /
  negative slot scores. One C++ decode step or prefill chunk per request must equal the oracle
  (``core.reference``): outputs, tags, hi copies, page bytes (scores to fp32 rounding).
* Invalid calls: a block id outside the cache, a position past the block table, ``own_from`` past
  the position, chunk rows outside q, a layout meta whose sub-arrays leave the region (slots beyond
  the page), a non-finite hi ratio: each must raise before touching the pages.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mikv_vllm.config import MiKVConfig, preset
from mikv_vllm.core import reference as ref
from mikv_vllm.core.layout import RegionLayout
from mikv_vllm.cpu import CpuOps, load
from mikv_vllm.cpu.ops import cpp_layout, layout_fields

from core._helpers import assert_pages, make_regions, structured_qkv

D = 64
CONFIGS = {
    "mikv": preset("mikv"),
    "int3-fp16-hi-r0.3": MiKVConfig(policy="mikv", lo_bits=3, hi_ratio=0.3, hi_dtype="float16"),
    "int8-bf16-nobal-g8-w3": MiKVConfig(policy="mikv", lo_bits=8, hi_ratio=0.2, hi_dtype="bfloat16", balancer=False,
                                        group_size=8, recent_window=3),
    "int2-window-scorer": MiKVConfig(policy="mikv", lo_bits=2, hi_ratio=0.25, scorer="window", obs_window=3),
    "lossless-r1": MiKVConfig(policy="mikv", lo_bits=4, hi_ratio=1.0, hi_dtype="float32"),
    "h2o": preset("h2o"),
    "rtn": preset("rtn"),
    # values at the keys' width with fp16 group metadata; keys and values far apart
    "int4-r03": preset("mikv-int4-r03"),
    "k2v8-nobal-g16": MiKVConfig(policy="mikv", k_bits=2, v_bits=8, hi_ratio=0.2, balancer=False, group_size=16),
}
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                    derandomize=True)


@st.composite
def page_states(draw, chunk: bool):
    """A valid page state and the next step's inputs (see the module docstring)."""
    name = draw(st.sampled_from(sorted(CONFIGS)))
    cfg = CONFIGS[name]
    n = draw(st.sampled_from([8, 16]))
    hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    ctxs = list(draw(st.lists(st.integers(0, 3 * n + 3), min_size=1, max_size=3)))
    seed = draw(st.integers(0, 2**20))
    share = 0                                      # blocks request 0 reads from request 1 (prefix caching)
    if len(ctxs) >= 2 and cfg.has_lo and draw(st.booleans()):
        share = draw(st.integers(1, 2))
        ctxs[0] = max(ctxs[0], share * n + draw(st.integers(0, n - 1)))
        ctxs[1] = max(ctxs[1], share * n)
    new = [draw(st.integers(2, n + 3)) if chunk else 1 for _ in ctxs]
    chunks = draw(st.lists(st.integers(1, 2 * n), min_size=1, max_size=4))
    plant = draw(st.booleans())
    return name, cfg, n, hkv, group, ctxs, new, seed, share, chunks, plant


def build(state):
    """Pages, block table, own_from and the next step's q/k/v of a drawn state."""
    name, cfg, n, hkv, group, ctxs, new, seed, share, chunks, plant = state
    event(f"config {name}")
    event(f"shared prefix blocks: {share}")
    event(f"stale state planted: {plant and cfg.hi_ratio > 0}")
    event(f"a context of 0: {0 in ctxs}; a partly filled block: {any(c % n for c in ctxs)}")
    lay = RegionLayout.build(cfg, n, D)
    need = [-(-(c + t) // n) for c, t in zip(ctxs, new)]
    num_blocks = sum(need) + 3
    pages = make_regions(lay, num_blocks, hkv, garbage=True, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_blocks, generator=gen)
    width = max(need) + 1
    table = perm[torch.randint(0, num_blocks, (len(ctxs), width), generator=gen)].clone()   # foreign columns
    used = 0
    for i, nb in enumerate(need):
        table[i, :nb] = perm[used:used + nb]
        used += nb
    own_from = [0] * len(ctxs)
    if share:
        table[0, :share] = table[1, :share]        # request 0 reads request 1's first blocks
        own_from[0] = share
    table = table.int()
    scale = 1 / math.sqrt(D)
    qkv = [structured_qkv(c + t, group * hkv, hkv, D, seed=seed + i) for i, (c, t) in enumerate(zip(ctxs, new))]
    for i in sorted(range(len(ctxs)), key=lambda i: i != 1):       # the writer of shared blocks first
        q, k, v = qkv[i]
        c0, j = own_from[i] * n, 0
        while c0 < ctxs[i]:
            c1 = min(ctxs[i], c0 + chunks[j % len(chunks)])
            ref.forward_request(pages, lay, cfg, table[i], c0, q[c0:c1], k[c0:c1], v[c0:c1], scale, own_from[i])
            c0, j = c1, j + 1
    if plant and lay.hi_slots:
        _plant_stale(lay, pages, table, ctxs, own_from, gen)
    step = [tuple(x[c:c + t] for x in qkv[i]) for i, (c, t) in enumerate(zip(ctxs, new))]
    return cfg, lay, pages, table, own_from, step, scale


def _plant_stale(lay, pages, table, ctxs, own_from, gen):
    """Stale state in some owned slots of every request: tags past the context, negative, 0, a free
    position (twice: the same position in two slots, both hi copies 0), odd slot scores."""
    views, r, n = lay.views(pages), lay.hi_slots, lay.block_size
    for i, c in enumerate(ctxs):
        nb = c // n + 1
        blocks = table[i, own_from[i]:nb].long()
        if blocks.numel() == 0:
            continue
        slots = torch.randperm(blocks.numel() * r, generator=gen)[: max(1, blocks.numel() * r // 3)]
        tags = views.tag[table[i, :nb].long()]
        free = torch.ones(c + 1, dtype=torch.bool)
        free[tags[(tags > 0) & (tags <= c)].long()] = False   # never a second copy of a live hi token
        free[0] = False
        pool = free.nonzero()[:, 0]
        kinds = [c + 1 + int(torch.randint(1, 50, (1,), generator=gen)), -int(torch.randint(1, 9, (1,), generator=gen)),
                 0, int(pool[torch.randint(0, pool.numel(), (1,), generator=gen)]) if pool.numel() else 0]
        vals = torch.tensor([kinds[int(j)] for j in torch.randint(0, 4, (slots.numel(),), generator=gen)])
        if pool.numel() and slots.numel() >= 2:
            vals[:2] = kinds[3]                                   # one position in two slots
        blk, rr = blocks[slots // r], slots % r
        views.tag[blk, :, rr] = vals.int()[:, None]
        views.k_hi[blk, :, rr] = 0
        views.v_hi[blk, :, rr] = 0
        odd = torch.tensor([torch.finfo(torch.float32).max, float("nan"), -3.0, 0.25])
        views.score[blk, :, rr] = odd[torch.randint(0, 4, (slots.numel(), pages.shape[1]), generator=gen)]


def _assert_same(lay, got, want, mine, oracle, what):
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, equal_nan=True, msg=lambda m: f"{what}: {m}")
    assert torch.equal(lay.views(mine).tag, lay.views(oracle).tag), what
    assert_pages(lay, mine, oracle, what)


@SETTINGS
@given(state=page_states(chunk=False))
def test_decode_step_matches_oracle_on_random_pages(state):
    cfg, lay, pages, table, own_from, step, scale = build(state)
    q, k, v = (torch.cat([s[j] for s in step]) for j in range(3))
    pos = state[5]
    mine, oracle = pages.clone(), pages.clone()
    want = ref.forward_decode(oracle, lay, cfg, table, pos, q, k, v, scale, own_from)
    got = CpuOps.forward_decode(mine, lay, cfg, table, pos, q, k, v, scale, own_from)
    _assert_same(lay, got, want, mine, oracle, f"decode {state[0]} {pos} own_from {own_from}")
    untouched = torch.ones(pages.shape[0], dtype=torch.bool)
    for i, p in enumerate(pos):
        untouched[table[i, : p // lay.block_size + 1].long()] = False
    assert torch.equal(mine[untouched], pages[untouched])        # foreign blocks: never written


@SETTINGS
@given(state=page_states(chunk=True))
def test_prefill_chunks_match_oracle_on_random_pages(state):
    cfg, lay, pages, table, own_from, step, scale = build(state)
    q, k, v = (torch.cat([s[j] for s in step]) for j in range(3))
    bounds = torch.tensor([0] + [s[0].shape[0] for s in step]).cumsum(0)
    rows = torch.stack([bounds[:-1], bounds[1:]], 1)
    ctxs = torch.tensor(state[5])
    mine, oracle = pages.clone(), pages.clone()
    want = ref.forward_chunks(oracle, lay, cfg, table, ctxs, rows, q, k, v, scale, own_from)
    got = CpuOps.forward_chunks(mine, lay, cfg, table, ctxs, rows, q, k, v, scale, own_from)
    _assert_same(lay, got, want, mine, oracle, f"prefill {state[0]} ctx {state[5]} T {state[6]} own {own_from}")


# ------------------------------------------------------------------------------------ invalid calls
BAD = ["block id high", "block id negative", "position past table", "own_from past position", "meta slots",
       "meta offset", "meta block size", "hi ratio"]
BAD_PREFILL = BAD + ["rows past q"]


def _meta_fault(lay, kind, amount):
    """The layout's C++ fields with one fault (its constructor must raise)."""
    fields = layout_fields(lay)
    if kind == "meta slots":       # more hi slots than the region holds (or than the block)
        small = 0 < lay.hi_slots < lay.block_size and amount % 2 == 0
        fields["hi_slots"] = lay.block_size if small else lay.block_size + amount    # a slot per position: past the page
    elif kind == "meta offset":    # one sub-array starts near or past the region's end
        live = [(name, on) for name, on in [("k_lo", lay.has_lo), ("v_lo", lay.has_lo), ("k_sz", lay.has_lo),
                                            ("v_sz", lay.has_lo), ("score", lay.hi_slots), ("tag", lay.hi_slots),
                                            ("k_hi", lay.hi_slots), ("v_hi", lay.hi_slots),
                                            ("balancer", lay.has_balancer)] if on]
        fields[live[amount % len(live)][0]] = lay.region_bytes - 1 - amount % 3 if amount % 4 else -4 * amount
    else:                          # block size 0 (a division by zero in every position)
        fields["block_size"] = 0
    return fields


@pytest.mark.parametrize("kind,prefill", [(k, False) for k in BAD] + [(k, True) for k in BAD_PREFILL])
@settings(max_examples=5, deadline=None, derandomize=True)
@given(state=page_states(chunk=False), amount=st.integers(1, 1000))
def test_invalid_calls_raise_before_writing(kind, prefill, state, amount):
    cfg, lay, pages, table, own_from, step, scale = build(state)
    n, pos = lay.block_size, list(state[5])
    q, k, v = (torch.cat([s[j] for s in step]) for j in range(3))
    b = len(pos)
    fields, ratio = layout_fields(lay), float(cfg.hi_ratio)
    table = table.clone()
    own = torch.tensor(own_from, dtype=torch.int64)
    if kind == "block id high":
        table[0, pos[0] // n] = pages.shape[0] + amount - 1
    elif kind == "block id negative":
        table[b - 1, 0] = -amount
    elif kind == "position past table":
        pos[0] = table.shape[1] * n + amount - 1
    elif kind == "own_from past position":
        own[0] = pos[0] // n + amount
    elif kind.startswith("meta"):
        fields = _meta_fault(lay, kind, amount)
    elif kind == "hi ratio":
        ratio = [float("nan"), float("inf"), -amount / 1000][amount % 3]
    event(f"invalid: {kind} ({'prefill' if prefill else 'decode'})")
    before = pages.clone()
    sinks, window = int(cfg.sink_tokens), -1 if cfg.recent_window is None else int(cfg.recent_window)
    with pytest.raises(RuntimeError, match="mikv_cpu"):
        meta = load().Layout(**fields)   # a bad field raises here, at construction
        if prefill:
            rows = torch.stack([torch.arange(b), torch.arange(b) + 1], 1)
            if kind == "rows past q":
                rows[b - 1, 1] = b + amount
            load().prefill_step(pages, meta, table, torch.tensor(pos), rows, q, k, v, scale, ratio, sinks, window,
                                -1, own, torch.zeros(b, dtype=torch.int64))
        else:
            load().decode_step(pages, meta, table, torch.tensor(pos), q, k, v, scale, True, True, ratio, sinks,
                               window, own, torch.zeros(b, dtype=torch.int64))
    assert torch.equal(pages, before)
