"""Per-layer MiKV counters kept by each attention impl (worker side).

Every MiKV attention impl owns one :class:`LayerStats`. ``MiKVAttentionImpl.forward``
brackets its per-request loop with :meth:`LayerStats.begin_step` and
:meth:`LayerStats.end_step`:

* token counters (host ints) are kept in every layer: the metadata builder counts the step's
  tokens once (:func:`step_token_counts`, ``MiKVMetadata.token_counts``), each layer adds them;
* hi-tier counters are measured only in *sampled* layers (``MIKV_STATS_LAYERS``:
  ``first`` - default, the worker's first MiKV attention layer; ``all``; ``off``).
  A sampled layer gathers the R tags of the step's requests once before and
  once after the loop (two gathers of ``[num_reqs, max_blocks, H, R]`` int32
  per step, no per-request work) and accumulates into device tensors, so
  nothing synchronises with the device until :meth:`snapshot` is called (on
  ``collective_rpc("mikv_stats")``).

Semantics (see docs/metrics.md): for a request with ``ctx`` cached tokens and
``T`` new tokens (``L = ctx + T``), before the step its hi set is the tags
``0 < tag <= ctx`` in its first ``ceil(ctx / N)`` blocks, after the step the
tags ``> 0`` in its first ``ceil(L / N)`` blocks. ``promoted`` counts tags
``> ctx`` after the step (only new tokens can enter the hi tier),
``demoted = hi_before + promoted - hi_after`` (demotion is one-way).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .. import envs

STATS_LAYERS_ENV = envs.STATS_LAYERS
STATS_LAYERS_MODES = envs.STATS_LAYERS_CHOICES


def stats_layers_mode() -> str:
    return envs.stats_layers()


def _is_mikv_layer(layer: Any) -> bool:
    return isinstance(getattr(getattr(layer, "impl", None), "stats", None), LayerStats)


def _first_mikv_layer(layer: Any) -> bool:
    """Whether ``layer`` is the first MiKV attention layer of this worker's model."""
    try:
        from vllm.forward_context import get_forward_context

        layers = get_forward_context().no_compile_layers
    except Exception:  # no forward context (unit tests): treat as the first
        return True
    for candidate in layers.values():
        if _is_mikv_layer(candidate):
            return candidate is layer
    return True


def step_token_counts(query_lens: torch.Tensor) -> tuple[int, int, int]:
    """(stored, prefill, decode) new tokens of a step from its per-request query lengths (host
    tensor): stored = all, prefill = those in multi-token chunks, decode = single-token rows."""
    q = query_lens.to(torch.int64)
    return int(q.clamp(min=0).sum()), int(q[q > 1].sum()), int((q == 1).sum())


@dataclass
class StepProbe:
    """What :meth:`LayerStats.begin_step` hands to :meth:`LayerStats.end_step`."""

    blocks: torch.Tensor            # [n, max_nb] int64 physical blocks (clamped)
    ctx: torch.Tensor               # [n, 1, 1, 1] int32 cached tokens before the step
    before_mask: torch.Tensor       # [n, max_nb, 1, 1] bool: block held context before the step
    after_mask: torch.Tensor        # [n, max_nb, 1, 1] bool: block holds tokens after the step
    hi_before: torch.Tensor         # [] int64
    seen: int                       # sum(L) * H


@dataclass
class LayerStats:
    """Counters of one attention layer since engine start."""

    steps: int = 0
    tokens_stored: int = 0          # new tokens written to the cache
    prefill_tokens: int = 0         # of those, in multi-token chunks
    decode_tokens: int = 0          # of those, single-token steps
    seen_tokens: int = 0            # (token, KV head) pairs of the last sampled step's requests
    sampled: bool | None = None     # hi counters measured here (decided on the first step)
    # device accumulators (sampled layers only): [promoted, demoted] cumulative, hi pairs last step
    _moves: torch.Tensor | None = field(default=None, repr=False)
    _hi_last: torch.Tensor | None = field(default=None, repr=False)

    # ------------------------------------------------------------- per step
    def begin_step(self, layer: Any, regions: torch.Tensor, layout: Any, meta: Any) -> StepProbe | None:
        """Before the request loop: count each request's hi pairs (sampled layers only)."""
        if self.sampled is None:
            mode = stats_layers_mode()
            self.sampled = mode == "all" or (mode == "first" and _first_mikv_layer(layer))
        if not self.sampled or not layout.hi_slots:
            return None
        qsl, seq_lens, n = meta.query_start_loc, meta.seq_lens, layout.block_size
        own = meta.own_from or [0] * len(seq_lens)   # prefix caching: shared columns are the writer's
        rows: list[int] = []
        owns: list[int] = []
        ctxs: list[int] = []
        nb_before: list[int] = []
        nb_after: list[int] = []
        seen = 0
        for i, seq_len in enumerate(seq_lens):
            t = qsl[i + 1] - qsl[i]
            if t <= 0:
                continue
            ctx = seq_len - t
            rows.append(i)
            owns.append(own[i])
            ctxs.append(ctx)
            nb_before.append(-(-ctx // n))
            nb_after.append(-(-seq_len // n))
            seen += seq_len
        if not rows:
            return None
        dev = regions.device
        max_nb = max(nb_after)
        host = torch.tensor([rows, ctxs, nb_before, nb_after, owns], dtype=torch.int64)
        host = host.to(dev, non_blocking=True) if dev.type != "cpu" else host
        row_idx, ctx, nbb, nba, first = host
        blocks = meta.block_table[row_idx, :max_nb].long().clamp(0, regions.shape[0] - 1)   # [n, max_nb]
        col = torch.arange(max_nb, device=dev)
        owned = col[None] >= first[:, None]          # a request counts the hi slots of its own blocks only
        before_mask = (owned & (col[None] < nbb[:, None]))[:, :, None, None]
        after_mask = (owned & (col[None] < nba[:, None]))[:, :, None, None]
        ctx4 = ctx.to(torch.int32)[:, None, None, None]
        tags = layout.views(regions).tag[blocks]                                         # [n, max_nb, H, R]
        hi_before = (before_mask & (tags > 0) & (tags <= ctx4)).sum()
        return StepProbe(blocks, ctx4, before_mask, after_mask, hi_before, seen * regions.shape[1])

    def end_step(self, probe: StepProbe | None, regions: torch.Tensor, layout: Any, meta: Any) -> None:
        """After the request loop: token counters (``meta.token_counts``, counted once per step by the
        builder); promoted / demoted / hi pairs (sampled layers)."""
        self.steps += 1
        stored, prefill, decode = meta.token_counts
        self.tokens_stored += stored
        self.prefill_tokens += prefill
        self.decode_tokens += decode
        if probe is None:
            return
        tags = layout.views(regions).tag[probe.blocks]
        live = probe.after_mask & (tags > 0)
        hi_after = live.sum()
        promoted = (live & (tags > probe.ctx)).sum()
        demoted = probe.hi_before + promoted - hi_after
        moves = torch.stack([promoted, demoted])
        self._moves = moves if self._moves is None else self._moves + moves
        self._hi_last = hi_after
        self.seen_tokens = probe.seen

    # ------------------------------------------------------------------ read
    def snapshot(self) -> dict[str, Any]:
        """Host copy of the counters (synchronises with the device)."""
        promoted, demoted = self._moves.tolist() if self._moves is not None else (0, 0)
        return {
            "steps": self.steps,
            "tokens_stored": self.tokens_stored,
            "prefill_tokens": self.prefill_tokens,
            "decode_tokens": self.decode_tokens,
            "sampled": bool(self.sampled),
            "promoted": int(promoted),
            "demoted": int(demoted),
            "hi_tokens": int(self._hi_last.item()) if self._hi_last is not None else 0,
            "seen_tokens": self.seen_tokens,
        }
