"""Shared prefix blocks (prefix caching): a reader's view of blocks it did not write is immutable.

Request A (the writer) fills a prefix; request B's block row starts with A's full prefix blocks
(``own_from`` = their count) and continues in blocks of its own, as vLLM hands out a cache hit.
"""

import math

import pytest
import torch

from mikv_vllm.config import MiKVConfig, preset
from mikv_vllm.core import reference as ref
from mikv_vllm.ops import torch_decode as tdec
from mikv_vllm.core.layout import RegionLayout

from ._helpers import INT3_R10, dense_attention, make_regions, structured_qkv

HQ, HKV, D, N = 6, 2, 32, 16
SCALE = 1 / math.sqrt(D)
SHARED = 3                 # shared full blocks
PREFIX = SHARED * N        # 48 shared tokens
A_LEN, B_LEN = 50, 130     # prompts: the shared prefix + own suffixes (A's recent window covers prefix tokens)
CONFIGS = {
    "int3-r0.1": INT3_R10,
    "mikv-paper": preset("mikv-paper"),
    "window-scorer": MiKVConfig(policy="mikv", lo_bits=3, hi_ratio=0.3, scorer="window", obs_window=8,
                                recent_window=3),
    "all-hi-fp32": MiKVConfig(policy="mikv", lo_bits=4, hi_ratio=1.0, hi_dtype="float32"),
}


def _qkv(seed_suffix: int, length: int):
    """The shared prefix's q/k/v (seed 0) followed by a suffix of its own."""
    pq, pk, pv = structured_qkv(PREFIX, HQ, HKV, D, seed=0)
    sq, sk, sv = structured_qkv(length - PREFIX, HQ, HKV, D, seed=seed_suffix)
    return torch.cat([pq, sq]), torch.cat([pk, sk]), torch.cat([pv, sv])


def _setup(cfg, a_decode: int = 0):
    lay = RegionLayout.build(cfg, N, D)
    regions = make_regions(lay, 64, HKV, garbage=True, seed=1)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(2))
    a_row = perm[:20].int()
    b_row = torch.cat([a_row[:SHARED], perm[20:40]]).int()       # B's hit: A's first blocks, then its own
    return lay, regions, a_row, b_row


def _decode(regions, lay, cfg, row, qkv, start, steps, own_from=0):
    q, k, v = qkv
    outs = [ref.forward_request(regions, lay, cfg, row, p, q[p:p + 1], k[p:p + 1], v[p:p + 1], SCALE, own_from)
            for p in range(start, start + steps)]
    return torch.cat(outs)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_reader_view_unchanged_while_writer_decodes(name):
    """(b): what B reads from the shared blocks (and its attention output over them) does not change
    while A decodes 200 more tokens; B never writes a byte of them."""
    cfg = CONFIGS[name]
    lay, regions, a_row, b_row = _setup(cfg)
    a = _qkv(11, A_LEN + 200)
    b = _qkv(12, B_LEN + 4)
    ref.forward_request(regions, lay, cfg, a_row, 0, *(x[:A_LEN] for x in a), SCALE)      # A's prefill
    shared = regions[a_row[:SHARED].long()].clone()
    ref.forward_request(regions, lay, cfg, b_row, PREFIX, *(x[PREFIX:B_LEN] for x in b), SCALE, own_from=SHARED)
    _decode(regions, lay, cfg, b_row, b, B_LEN, 2, own_from=SHARED)
    assert torch.equal(regions[a_row[:SHARED].long()], shared)      # the reader wrote nothing shared

    ctx = B_LEN + 2

    def reader_view(own_from=SHARED):
        bal = ref.load_balancer(regions, lay, b_row)
        k, v, valid = ref.gather_context(regions, lay, b_row, ctx, bal, own_from,
                                         ref.shared_hi_limit(cfg, lay, own_from))
        q = b[0][ctx:ctx + 1]
        return k, v, valid, dense_attention(q, k.transpose(0, 1), v.transpose(0, 1), SCALE, offset=ctx)

    before = reader_view()
    naive = reader_view(own_from=0)      # reading A's slots as one's own (what own_from prevents)
    early = regions.clone()
    b_step_early = _decode(early, lay, cfg, b_row, b, B_LEN + 2, 1, own_from=SHARED)
    _decode(regions, lay, cfg, a_row, a, A_LEN, 200)                                       # A decodes
    assert not torch.equal(regions[a_row[:SHARED].long()], shared) or not lay.hi_slots    # A did change them
    after = reader_view()
    for x, y in zip(before, after):
        assert torch.equal(x, y)
    if lay.hi_slots and not ref.never_demotes(cfg, lay):   # the check can fail: A changed its slots
        assert not torch.equal(naive[0], reader_view(own_from=0)[0])
    # B's next decode step gives the same output before and after A's 200 steps
    b_step_late = _decode(regions, lay, cfg, b_row, b, B_LEN + 2, 1, own_from=SHARED)
    assert torch.equal(b_step_early, b_step_late)


def test_lossless_hit_equals_cold_run():
    """(d): with r = 1 (never demotes) a hit reads every prefix token's hi copy: same outputs as cold."""
    cfg = CONFIGS["all-hi-fp32"]
    assert ref.never_demotes(cfg, RegionLayout.build(cfg, N, D))
    lay, regions, a_row, b_row = _setup(cfg)
    a = _qkv(11, A_LEN)
    b = _qkv(12, B_LEN + 6)
    cold_regions = regions.clone()
    cold = torch.cat([ref.forward_request(cold_regions, lay, cfg, b_row, 0, *(x[:B_LEN] for x in b), SCALE)[PREFIX:],
                      _decode(cold_regions, lay, cfg, b_row, b, B_LEN, 6)])
    ref.forward_request(regions, lay, cfg, a_row, 0, *(x[:A_LEN] for x in a), SCALE)
    hit = torch.cat([ref.forward_request(regions, lay, cfg, b_row, PREFIX, *(x[PREFIX:B_LEN] for x in b), SCALE,
                                         own_from=SHARED),
                     _decode(regions, lay, cfg, b_row, b, B_LEN, 6, own_from=SHARED)])
    assert (hit - cold).abs().max().item() < 1e-5


def test_lossy_hit_reads_sinks_and_lo():
    """A lossy hit reads the shared tokens' lo copies and the sinks' hi copies (never demoted)."""
    cfg = CONFIGS["int3-r0.1"]
    lay, regions, a_row, b_row = _setup(cfg)
    a = _qkv(11, A_LEN)
    ref.forward_request(regions, lay, cfg, a_row, 0, *(x[:A_LEN] for x in a), SCALE)
    limit = ref.shared_hi_limit(cfg, lay, SHARED)
    assert limit == cfg.sink_tokens
    bal = ref.load_balancer(regions, lay, b_row)
    k, _, _ = ref.gather_context(regions, lay, b_row, PREFIX, bal, SHARED, limit)
    lo_k, _, _ = ref.lo_context(regions, lay, b_row[:SHARED].long(), PREFIX, bal)
    hi_k = a[1].transpose(0, 1)[:, :limit].to(lay.hi_dtype).float()
    assert torch.equal(k[:, :limit], hi_k)
    assert torch.equal(k[:, limit:], lo_k[:, limit:])


def test_batched_decode_with_shared_rows_matches_per_request():
    cfg = CONFIGS["int3-r0.1"]
    lay, regions, a_row, b_row = _setup(cfg)
    a, b = _qkv(11, A_LEN + 5), _qkv(12, B_LEN + 5)
    ref.forward_request(regions, lay, cfg, a_row, 0, *(x[:A_LEN] for x in a), SCALE)
    ref.forward_request(regions, lay, cfg, b_row, PREFIX, *(x[PREFIX:B_LEN] for x in b), SCALE, own_from=SHARED)
    solo, batch = regions.clone(), regions.clone()
    width = 20
    table = torch.stack([a_row[:width], torch.nn.functional.pad(b_row, (0, width - b_row.numel()))])
    for step in range(5):
        pos = [A_LEN + step, B_LEN + step]
        q, k, v = (torch.stack([a[j][pos[0]], b[j][pos[1]]]) for j in range(3))
        want = torch.cat([
            ref.forward_request(solo, lay, cfg, a_row, pos[0], q[:1], k[:1], v[:1], SCALE),
            ref.forward_request(solo, lay, cfg, b_row, pos[1], q[1:], k[1:], v[1:], SCALE, own_from=SHARED)])
        got = tdec.forward_decode(batch, lay, cfg, table, pos, q, k, v, SCALE, own_from=[0, SHARED])
        assert (got - want).abs().max().item() < 1e-5
        assert torch.equal(lay.views(batch).tag, lay.views(solo).tag)


def test_own_from_past_the_context_raises():
    cfg = CONFIGS["int3-r0.1"]
    lay, regions, a_row, _ = _setup(cfg)
    q, k, v = _qkv(11, A_LEN)
    with pytest.raises(ValueError, match="own_from"):
        ref.forward_request(regions, lay, cfg, a_row, N, q[N:N + 4], k[N:N + 4], v[N:N + 4], SCALE, own_from=2)
