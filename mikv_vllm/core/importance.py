"""Hi-set selection per (request, layer, KV head), vectorised over KV heads (and requests).

Candidates are the tokens that may hold a hi slot after this step: the
currently-hi tokens and the tokens just written (demotion is one-way, so a token
that lost its hi copy is never a candidate again). With ``L`` tokens in the
request and ``num_slots`` physical hi slots (used + free) the budget is
``B = min(config.budget(L), num_slots)``; ``W = config.recent_for(B)``.

Priority (the first ``B`` candidates of this order win, per head):

1. sinks      ``pos < config.sink_tokens``   lower position first
2. recent     ``pos >= L - W``               higher position first
3. heavy      everything else                higher score first, ties: higher position
"""

from __future__ import annotations

import torch

from ..config import MiKVConfig

SINK, RECENT, HEAVY, NOT_A_CANDIDATE = 2, 1, 0, -1


def hi_budget(config: MiKVConfig, seq_len: int, num_slots: int) -> int:
    """``B = min(floor(r * L), num_slots)``."""
    return max(0, min(config.budget(seq_len), num_slots))


def _budget_tensor(config: MiKVConfig, seq_len: torch.Tensor, num_slots: torch.Tensor) -> torch.Tensor:
    """:func:`hi_budget` elementwise (same float64 arithmetic as ``config.budget``)."""
    budget = torch.floor(config.hi_ratio * seq_len.double() + 1e-9).long()
    return torch.minimum(budget, num_slots.long()).clamp(min=0)


def _recent_tensor(config: MiKVConfig, budget: torch.Tensor) -> torch.Tensor:
    """``config.recent_for`` elementwise."""
    if config.recent_window is not None:
        return torch.full_like(budget, config.recent_window)
    return budget // 2


def priority_tiers(positions: torch.Tensor, seq_len, config: MiKVConfig, budget) -> torch.Tensor:
    """Tier per candidate (SINK/RECENT/HEAVY; NOT_A_CANDIDATE where position < 0).

    ``seq_len`` / ``budget``: ints, or tensors broadcastable to ``positions``.
    """
    if isinstance(budget, torch.Tensor):
        recent_start = seq_len - _recent_tensor(config, budget)
    else:
        recent_start = seq_len - config.recent_for(budget)
    tier = torch.full_like(positions, HEAVY)
    tier = torch.where(positions >= recent_start, torch.full_like(tier, RECENT), tier)
    tier = torch.where(positions < config.sink_tokens, torch.full_like(tier, SINK), tier)
    return torch.where(positions >= 0, tier, torch.full_like(tier, NOT_A_CANDIDATE))


def select_hi(positions: torch.Tensor, scores: torch.Tensor, seq_len, config: MiKVConfig,
              num_slots) -> torch.Tensor:
    """Which candidates hold a hi slot after this step.

    positions  int ``[..., C]`` token positions, -1 marks "no candidate" (padding).
    scores     float ``[..., C]`` accumulated attention mass of each candidate.
    seq_len, num_slots  ints, or int tensors broadcastable to ``positions[..., :1]``
               (one request per leading index: the batched decode step).
    Returns bool ``[..., C]`` with at most ``min(floor(r * seq_len), num_slots)``
    True entries per row, all on candidates.
    """
    pos = positions.long()
    valid = pos >= 0
    if isinstance(seq_len, torch.Tensor) or isinstance(num_slots, torch.Tensor):
        seq_len = torch.as_tensor(seq_len, device=pos.device).long()
        budget = _budget_tensor(config, seq_len, torch.as_tensor(num_slots, device=pos.device))
        if pos.numel() == 0 or not bool((budget > 0).any()):
            return torch.zeros_like(valid)
    else:
        budget = hi_budget(config, seq_len, num_slots)
        if budget == 0 or pos.numel() == 0:
            return torch.zeros_like(valid)
    tier = priority_tiers(pos, seq_len, config, budget)
    score = torch.nan_to_num(scores.double(), nan=-float("inf"))
    within = torch.where(tier == SINK, -pos.double(), torch.where(tier == RECENT, pos.double(), score))
    # lexicographic order (tier desc, within desc, position desc) via stable sorts, last key first
    order = torch.argsort(pos, dim=-1, descending=True, stable=True)
    order = order.gather(-1, torch.argsort(within.gather(-1, order), dim=-1, descending=True, stable=True))
    order = order.gather(-1, torch.argsort(tier.gather(-1, order), dim=-1, descending=True, stable=True))
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order).contiguous())
    return valid & (rank < budget)
