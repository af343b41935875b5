"""Hi-set selection per (request, layer, KV head), vectorised over KV heads (and requests).

The whole selection rule lives here (docs/design.md, "Selection semantics"):

* **Budget** (:func:`hi_budget`, the one formula): for a request of ``L`` tokens whose blocks
  hold ``num_slots`` physical hi slots, ``B = min(max(floor(r * L), min(S, L)), num_slots)``
  with ``S = config.sink_tokens``. The sink floor ``min(S, L)`` makes attention sinks hi from
  the first step for every prompt length, whenever the request's slots allow it (the slots are
  allocated with the page anyway, so the floor costs no memory).
* **Recent window** (:func:`recent_window`): ``W = config.recent_window``, or ``B // 2``.
* **Candidates**: the currently-hi tokens and the tokens just written. Demotion is one-way (the
  raw K/V of a demoted token is gone), so no other token can become hi again.
* **Priority** (the first ``B`` candidates of this order win, per head):

  1. sinks      ``pos < S``          lower position first
  2. recent     ``pos >= L - W``     higher position first
  3. heavy      everything else      higher accumulated score first, ties: higher position

Because the budget never shrinks as ``L`` grows and sinks are first, a sink that is hi stays
hi for the request's life.
"""

from __future__ import annotations

import torch

from ..config import MiKVConfig

SINK, RECENT, HEAVY, NOT_A_CANDIDATE = 2, 1, 0, -1


def hi_budget(config: MiKVConfig, seq_len, num_slots):
    """``B = min(max(floor(r * L), min(S, L)), num_slots)``; ints in, int out, else long tensors.

    ``seq_len`` / ``num_slots``: ints, or int tensors (broadcast together).
    """
    if not isinstance(seq_len, torch.Tensor) and not isinstance(num_slots, torch.Tensor):
        return int(hi_budget(config, torch.tensor(seq_len), torch.tensor(num_slots)))
    device = seq_len.device if isinstance(seq_len, torch.Tensor) else num_slots.device
    length = torch.as_tensor(seq_len, device=device).long()
    by_ratio = torch.floor(config.hi_ratio * length.double() + 1e-9).long()   # float64, like the paper's r*L
    sinks = length.clamp(max=config.sink_tokens)
    budget = torch.maximum(by_ratio, sinks) if config.hi_ratio > 0 else by_ratio
    return torch.minimum(budget, torch.as_tensor(num_slots, device=device).long()).clamp(min=0)


def recent_window(config: MiKVConfig, budget):
    """Recent-window length ``W`` for a budget (int or tensor): explicit, or half the budget."""
    if config.recent_window is not None:
        return torch.full_like(budget, config.recent_window) if isinstance(budget, torch.Tensor) \
            else config.recent_window
    return budget // 2


def priority_tiers(positions: torch.Tensor, seq_len, config: MiKVConfig, budget) -> torch.Tensor:
    """Tier per candidate (SINK/RECENT/HEAVY; NOT_A_CANDIDATE where position < 0).

    ``seq_len`` / ``budget``: ints, or tensors broadcastable to ``positions``.
    """
    recent_start = seq_len - recent_window(config, budget)
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
    Returns bool ``[..., C]`` with at most :func:`hi_budget` True entries per row, all on
    candidates.
    """
    pos = positions.long()
    valid = pos >= 0
    if isinstance(seq_len, torch.Tensor) or isinstance(num_slots, torch.Tensor):
        seq_len = torch.as_tensor(seq_len, device=pos.device).long()
        budget = hi_budget(config, seq_len, torch.as_tensor(num_slots, device=pos.device))
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
