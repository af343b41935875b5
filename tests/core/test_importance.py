"""Hi-set selection: budget, sinks, recent window, heavy hitters, ties, one-way candidates."""

import torch

from mikv_vllm.config import MiKVConfig
from mikv_vllm.core.importance import hi_budget, select_hi


def _cfg(**kw):
    base = dict(policy="mikv", lo_bits=2, hi_ratio=0.25, sink_tokens=2, recent_window=None)
    base.update(kw)
    return MiKVConfig(**base)


def _selected(mask, positions):
    return [sorted(positions[h][mask[h]].tolist()) for h in range(mask.shape[0])]


def test_budget_is_ratio_with_a_sink_floor_capped_by_slots():
    cfg = _cfg(hi_ratio=0.2, sink_tokens=2)
    assert hi_budget(cfg, 100, 1000) == 20          # floor(0.2 * 100)
    assert hi_budget(cfg, 100, 7) == 7              # physical slots
    assert hi_budget(cfg, 4, 10) == 2               # floor(0.8) = 0 < sink floor min(2, 4)
    assert hi_budget(cfg, 1, 10) == 1               # a one-token prompt: its sink
    assert hi_budget(cfg, 4, 1) == 1
    assert hi_budget(cfg, 0, 10) == 0
    cfg4 = _cfg(hi_ratio=0.1, sink_tokens=4)
    assert [hi_budget(cfg4, n, 100) for n in (3, 6, 25, 39, 40, 41, 1000)] == [3, 4, 4, 4, 4, 4, 100]
    assert hi_budget(_cfg(hi_ratio=0.3, sink_tokens=0), 5, 10) == 1   # no sinks, no floor
    # float64 r*L like the paper: 0.29 * 100 is 28.999999999999996
    assert hi_budget(_cfg(hi_ratio=0.29), 100, 1000) == 29


def test_budget_tensor_form_equals_int_form():
    cfg = _cfg(hi_ratio=0.07, sink_tokens=3)
    lengths = torch.arange(0, 300)
    slots = torch.randint(0, 40, (300,), generator=torch.Generator().manual_seed(0))
    got = hi_budget(cfg, lengths, slots)
    assert got.dtype == torch.int64
    assert got.tolist() == [hi_budget(cfg, int(n), int(s)) for n, s in zip(lengths, slots)]


def test_priority_sinks_recent_heavy():
    cfg = _cfg(hi_ratio=0.25)                       # L = 32 -> B = 8, recent W = 4, sinks 2
    positions = torch.arange(32).unsqueeze(0)
    scores = torch.zeros(1, 32)
    scores[0, 10], scores[0, 20], scores[0, 5] = 5.0, 4.0, 3.0
    scores[0, 0] = -1.0                             # sinks win regardless of score
    sel = select_hi(positions, scores, 32, cfg, num_slots=100)
    assert _selected(sel, positions) == [[0, 1, 10, 20, 28, 29, 30, 31]]


def test_heavy_ties_prefer_higher_position():
    cfg = _cfg(hi_ratio=0.25, sink_tokens=0, recent_window=0)
    positions = torch.arange(16).unsqueeze(0)
    scores = torch.ones(1, 16)
    sel = select_hi(positions, scores, 16, cfg, num_slots=100)    # B = 4
    assert _selected(sel, positions) == [[12, 13, 14, 15]]


def test_budget_smaller_than_pinned_tokens():
    cfg = _cfg(hi_ratio=0.1, sink_tokens=4, recent_window=8)  # L = 30 -> r*L = 3 < sinks: B = 4
    positions = torch.arange(30).unsqueeze(0)
    sel = select_hi(positions, torch.rand(1, 30), 30, cfg, num_slots=100)
    assert _selected(sel, positions) == [[0, 1, 2, 3]]           # every sink, no recent token
    sel = select_hi(positions, torch.rand(1, 30), 30, cfg, num_slots=3)
    assert _selected(sel, positions) == [[0, 1, 2]]              # slots cap: lower sink positions first
    cfg = _cfg(hi_ratio=0.2, sink_tokens=1, recent_window=10)   # B = 6: 1 sink + 5 newest
    sel = select_hi(positions, torch.rand(1, 30), 30, cfg, num_slots=100)
    assert _selected(sel, positions) == [[0, 25, 26, 27, 28, 29]]


def test_per_head_and_only_candidates():
    cfg = _cfg(hi_ratio=0.25, sink_tokens=0, recent_window=0)
    # head 0: candidates 3, 7, 9 and the new tokens 14, 15; head 1: only new tokens.
    positions = torch.tensor([[3, -1, 7, 9, 14, 15], [-1, -1, -1, -1, 14, 15]])
    scores = torch.tensor([[9.0, 100.0, 1.0, 8.0, 0.5, 7.0], [0.0, 100.0, 0.0, 0.0, 1.0, 2.0]])
    sel = select_hi(positions, scores, 16, cfg, num_slots=10)    # B = 4
    assert _selected(sel, positions) == [[3, 7, 9, 15], [14, 15]]
    assert not sel[:, 1].any()                                  # padding never selected


def test_physical_slots_cap_and_zero_budget():
    cfg = _cfg(hi_ratio=1.0, sink_tokens=0)
    positions = torch.arange(10).expand(3, 10)
    sel = select_hi(positions, torch.rand(3, 10), 10, cfg, num_slots=4)
    assert (sel.sum(1) == 4).all()
    cfg = _cfg(hi_ratio=0.05, sink_tokens=0)
    assert not select_hi(positions, torch.rand(3, 10), 10, cfg, num_slots=4).any()
    cfg = _cfg(hi_ratio=0.05, sink_tokens=2)                    # the sink floor: B = 2
    assert _selected(select_hi(positions, torch.rand(3, 10), 10, cfg, num_slots=4), positions) == [[0, 1]] * 3


def test_nan_scores_rank_last():
    cfg = _cfg(hi_ratio=0.25, sink_tokens=0, recent_window=0)
    positions = torch.arange(8).unsqueeze(0)
    scores = torch.tensor([[float("nan"), 1, 2, 3, 4, float("nan"), 0, 0]])
    sel = select_hi(positions, scores, 8, cfg, num_slots=8)   # B = 2
    assert _selected(sel, positions) == [[3, 4]]
