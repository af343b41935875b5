"""The stated workspace of the Triton path: one byte budget for every temporary of one op call.

``MIKV_VLLM_WORKSPACE_MB`` (default 512) bounds the temporaries of one
``forward_decode`` / ``forward_request`` call of :mod:`.ops`, whatever the batch holds:

* decode: requests are grouped by context length (:func:`plan_decode_groups`) so that each
  group's padded buffers (hi-slot map, logits scratch, split partials, the torch hi
  maintenance) fit; one 128k request among 256 short ones runs in its own group instead of
  padding the others to 128k.
* prefill chunks: the context is attended in key chunks of whole blocks with an online softmax,
  query rows in blocks (:func:`plan_prefill`); nothing is dequantized beyond one key chunk.

What stays proportional to a request's length is the bookkeeping of the hi set: the decode
hi-slot map (4 bytes per position and KV head) and the reads and sorts of the request's hi slots'
tags and scores (scores live in the hi slots, core.layout; ``SLOT_BYTES`` per slot, a few bytes
per position at the usual ratios) - a fraction of the request's own page bytes;
:func:`required_workspace` gives the smallest workspace for a deployment's
``max_model_len`` and token budget, and the ops raise (no silent overrun) when a request does
not fit. vLLM's memory profile skips attention, so the glue reserves the workspace while
profiling (:func:`reserve_workspace`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import envs
from ..core.layout import RegionLayout

WORKSPACE_ENV = envs.WORKSPACE_MB
DEFAULT_WORKSPACE_MB = envs.DEFAULT_WORKSPACE_MB
MAX_SPLITS = 64

# Upper bounds (bytes) of the temporaries per unit, read off the code and checked against
# measured peaks in tests/kernels/test_workspace.py (the tests fail if they are too small).
SLOT_BYTES = 160        # per hi slot and KV head: hi-slot map build, tag / score reads, select_hi sorts
POS_BYTES = 4           # per position and KV head: the decode hi-slot map (int32); scores are per slot
LOGIT_BYTES = 4         # per position and query head: fp32 logits scratch (decode)


def workspace_bytes() -> int:
    """The workspace budget in bytes from ``MIKV_VLLM_WORKSPACE_MB`` (positive integer MiB)."""
    return envs.workspace_mb() << 20


class WorkspaceTooSmall(RuntimeError):
    """One request's unavoidable temporaries exceed the workspace."""


@dataclass(frozen=True)
class Dims:
    """Shapes that size the temporaries: query / KV heads, head dim, page layout."""

    hq: int
    h: int
    layout: RegionLayout

    @property
    def d(self) -> int:
        return self.layout.head_dim


def _slots(dims: Dims, length: int) -> int:
    """Hi slots per KV head of the blocks covering ``length`` positions."""
    n = dims.layout.block_size
    return -(-max(1, length) // n) * dims.layout.hi_slots


def _per_request_bytes(dims: Dims, length: int) -> int:
    """Temporaries that scale with one request's length: slot map (per position), the hi slots'
    tags / scores and the selection (per slot)."""
    if not dims.layout.hi_slots:
        return 0
    n = dims.layout.block_size
    padded = -(-(length + 1) // n) * n
    return dims.h * (padded * POS_BYTES + _slots(dims, length + 1) * SLOT_BYTES)


def decode_group_bytes(dims: Dims, n_req: int, max_ctx: int, splits: int) -> int:
    """Upper bound of one decode group's temporaries (``n_req`` requests, padded to ``max_ctx``)."""
    hq, h, d = dims.hq, dims.h, dims.d
    lcap = max_ctx + 1
    logits = n_req * hq * lcap * LOGIT_BYTES if dims.layout.hi_slots else 0
    partials = n_req * hq * max(1, splits) * (d + 2) * 4
    # q/k/v copies, balancer, out, lse; the new token's mass [n, H] fp32 (the upkeep's input)
    small = n_req * (hq * (3 * d + 4) * 4 + 6 * h * d * 4 + h * 4 + 64)
    table = n_req * (-(-lcap // dims.layout.block_size) + 1) * 12
    return logits + partials + small + table + n_req * _per_request_bytes(dims, lcap)


def decode_output_bytes(dims: Dims, batch: int) -> int:
    """The fp32 outputs and index vectors of a whole decode call (live across its groups)."""
    return batch * (dims.hq * dims.d * 4 + 64)


def plan_decode_groups(dims: Dims, ctx_lens: list[int], budget: int, splits_for) -> list[list[int]]:
    """Request indices grouped by ascending context, each group's :func:`decode_group_bytes`
    within ``budget`` minus the call's outputs; raises :class:`WorkspaceTooSmall` when one request
    alone does not fit. ``splits_for(n_req, max_ctx)`` gives the split count of a launch."""
    avail = budget - decode_output_bytes(dims, len(ctx_lens))
    groups: list[list[int]] = []
    for i in sorted(range(len(ctx_lens)), key=lambda j: ctx_lens[j]):
        c = int(ctx_lens[i])
        if groups:
            n = len(groups[-1]) + 1
            if decode_group_bytes(dims, n, c, splits_for(n, c)) <= avail:
                groups[-1].append(i)
                continue
        need = decode_group_bytes(dims, 1, c, splits_for(1, c))
        if need > avail:
            raise WorkspaceTooSmall(f"a decode request of {c} tokens needs {need >> 20} MiB of temporaries, "
                                    f"the workspace has {avail >> 20} MiB left; raise {WORKSPACE_ENV}")
        groups.append([i])
    return groups


def prefill_tile_bytes(dims: Dims, rows: int, chunk: int) -> int:
    """Temporaries of one (query rows x key chunk) tile of the chunked prefill attention."""
    hq, h, d = dims.hq, dims.h, dims.d
    kv = 2 * h * chunk * d * 4 * 3                    # K/V fp32 + dequantize intermediates
    logits = hq * rows * chunk * 4 * 3                # logits, probabilities, mask
    state = hq * rows * (d + 2) * 4 * 3               # queries, running (max, sum, acc) and update
    return kv + logits + state


def prefill_fixed_bytes(dims: Dims, t: int, ctx: int) -> int:
    """Temporaries of a prefill chunk independent of the tiling: fp32 output, scaled queries,
    row statistics, score mass and the hi-slot selection over the request."""
    hq, h, d = dims.hq, dims.h, dims.d
    length = ctx + t
    out = t * hq * d * 4
    stats = 2 * t * hq * 4
    mass = h * length * 4 if dims.layout.hi_slots else 0
    sel = _per_request_bytes(dims, length) + h * t * SLOT_BYTES
    return out + stats + mass + sel


def plan_prefill(dims: Dims, t: int, ctx: int, budget: int) -> tuple[int, int]:
    """(query rows per block, key positions per chunk, a multiple of the block size) whose tile
    fits ``budget`` next to :func:`prefill_fixed_bytes`; prefers all rows, then wide chunks."""
    n = dims.layout.block_size
    avail = budget - prefill_fixed_bytes(dims, t, ctx)
    full = max(n, -(-max(ctx, t) // n) * n)
    rows = max(1, t)
    while True:
        chunk = full
        while chunk > n and prefill_tile_bytes(dims, rows, chunk) > avail:
            chunk = max(n, (chunk // 2) // n * n)
        if prefill_tile_bytes(dims, rows, chunk) <= avail and (chunk >= min(full, 256) or rows == 1):
            return rows, chunk
        if rows == 1:
            break
        rows = max(1, rows // 2)
    raise WorkspaceTooSmall(f"a prefill chunk of {t} tokens at context {ctx} needs more than the "
                            f"{budget >> 20} MiB workspace; raise {WORKSPACE_ENV}")


def required_workspace(dims: Dims, max_model_len: int, max_tokens: int) -> int:
    """Smallest workspace with which one request of ``max_model_len`` tokens decodes and a prefill
    chunk of ``max_tokens`` tokens at the end of such a request runs (coarse tiles included)."""
    decode = decode_output_bytes(dims, 1) + decode_group_bytes(dims, 1, max_model_len, MAX_SPLITS)
    t = min(max_tokens, max_model_len)
    tile = prefill_tile_bytes(dims, min(t, 64), dims.layout.block_size * 16)
    prefill = prefill_fixed_bytes(dims, t, max_model_len - t) + tile
    return max(decode, prefill)


def check_workspace(dims: Dims, max_model_len: int, max_tokens: int, budget: int | None = None) -> int:
    """Raise :class:`WorkspaceTooSmall` at start-up when ``budget`` (default :func:`workspace_bytes`)
    is below :func:`required_workspace` for this deployment; returns the budget."""
    budget = workspace_bytes() if budget is None else int(budget)
    need = required_workspace(dims, max_model_len, max_tokens)
    if need > budget:
        raise WorkspaceTooSmall(f"max_model_len {max_model_len} with {max_tokens}-token steps needs a "
                                f"{-(-need // (1 << 20))} MiB workspace, {WORKSPACE_ENV} gives {budget >> 20} MiB")
    return budget


def reserve_workspace(device: torch.device | str, nbytes: int | None = None) -> int:
    """Allocate and free ``nbytes`` (default :func:`workspace_bytes`) on ``device``: called from the
    attention forward of vLLM's profiling run (attention is otherwise skipped there), it makes the
    torch peak - and so vLLM's non-KV memory - include the workspace. Returns the bytes."""
    nbytes = workspace_bytes() if nbytes is None else int(nbytes)
    buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
    del buf
    return nbytes
