"""Score accumulation: a hi slot's score grows by the attention mass of *its own* token.

The selection ranks heavy hitters by these scores, so a slot that collected a neighbour's mass
(off by one position) would promote and keep the wrong tokens. Both the prefill form
(``accumulate_scores``) and the batched decode form (``accumulate_scores_decode``) are checked
against hand-placed tags and a mass that differs at every position.
"""

from __future__ import annotations

import torch

from mikv_vllm.core import reference as ref
from mikv_vllm.ops import torch_decode as tdec
from mikv_vllm.core.layout import RegionLayout

from ._helpers import INT3_R10, make_regions

N, D, H = 16, 64, 2


def _page_with_tags(positions: list[list[int]]):
    """One block per request; per KV head h, slot s holds token ``positions[h][s]`` (None = empty)."""
    lay = RegionLayout.build(INT3_R10, N, D)
    assert lay.hi_slots == 2
    regions = make_regions(lay, 2, H)
    views = lay.views(regions)
    for h, pos in enumerate(positions):
        for s, p in enumerate(pos):
            views.tag[0, h, s] = 0 if p is None else p + 1
    views.score[0] = 0.5     # a score from earlier steps, kept and added to
    return lay, regions


def _mass(length: int) -> torch.Tensor:
    """[H, L] with a distinct value at every (head, position): 1 + position + 100 * head."""
    return (1 + torch.arange(length, dtype=torch.float32))[None] + 100 * torch.arange(H)[:, None]


def test_prefill_scores_take_the_mass_of_the_slots_own_token():
    lay, regions = _page_with_tags([[3, 9], [0, None]])
    ref.accumulate_scores(regions, lay, torch.tensor([0]), 12, _mass(12))
    score = lay.views(regions).score[0].float()
    # head 0: tokens 3 and 9 get mass 4 and 10; head 1: token 0 gets 101, the empty slot stays
    assert torch.equal(score, torch.tensor([[0.5 + 4, 0.5 + 10], [0.5 + 101, 0.5]]))


def test_prefill_scores_skip_tokens_not_yet_in_the_context():
    lay, regions = _page_with_tags([[3, 9], [0, 12]])
    ref.accumulate_scores(regions, lay, torch.tensor([0]), 10, _mass(14))     # token 12 is not context yet
    score = lay.views(regions).score[0].float()
    assert torch.equal(score, torch.tensor([[0.5 + 4, 0.5 + 10], [0.5 + 101, 0.5]]))


def test_decode_scores_take_the_mass_of_the_slots_own_token():
    lay, regions = _page_with_tags([[3, 9], [0, None]])
    tables = torch.tensor([[0]], dtype=torch.int32)
    pos = torch.tensor([12])                                      # the new token sits at position 12
    tdec.accumulate_scores_decode(regions, lay, tables, pos, _mass(13)[None])
    score = lay.views(regions).score[0].float()
    assert torch.equal(score, torch.tensor([[0.5 + 4, 0.5 + 10], [0.5 + 101, 0.5]]))
