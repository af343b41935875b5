"""The step plan: everything a layer's MiKV ops need about one engine step, made once per step.

The metadata builder (vllm_glue/backend.py) turns vLLM's per-step metadata into a
:class:`StepPlan` with a :class:`PlanBuilder` (no vllm import here); every attention layer of the
step reads the same plan, so no layer recomputes an index, a length, a budget or a bound. The
plan's tensors are views into buffers the builder allocates once (sized by the engine's bounds:
rows per step, block-table columns) and refills each step, so a plan is valid until the next
step's plan is built. Op-set specific launch plans (decode groups, split sizes, device copies)
are filled once per step by ``ops.prepare(plan, ...)`` into ``plan.kernel``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import MiKVConfig
from ..core.layout import RegionLayout
from ..core.page import shared_hi_limits


@dataclass
class DecodePlan:
    """The step's one-token rows (decodes, and first tokens at context 0), batched.

    ``tokens`` int64 ``[B]`` their query rows (on the queries' device); ``pos`` int64 ``[B]`` (host)
    their context lengths = new-token positions, ``pos_dev`` the same on the cache's device;
    ``max_pos`` the largest (host int); ``block_table`` int32 ``[B, max_pos // N + 1]`` (contiguous,
    cache device) their block-table rows; ``leading`` whether the rows are exactly query rows
    ``0..B-1``; ``own_from`` / ``shared_hi`` int64 ``[B]`` (host) each row's first owned block and the
    largest tag it may read from its shared blocks (``core.page.shared_hi_limit``), zeros when
    ``shared`` is False; ``kernel``: the op set's launch plan (``ops.prepare``); ``full_table`` int32
    ``[B, W]`` the rows' whole block-table rows (a view of the engine's table when ``leading``: fixed
    address and width, what a captured CUDA graph reads); ``state``: the builder's buffers that
    outlive a step (op sets keep their persistent device buffers there). A position of -1 is a
    padded row (a captured batch's padding): ``seq = pos + 1 = 0``."""

    tokens: torch.Tensor
    pos: torch.Tensor
    pos_dev: torch.Tensor
    max_pos: int
    block_table: torch.Tensor
    leading: bool
    own_from: torch.Tensor
    shared_hi: torch.Tensor
    shared: bool = False
    kernel: dict = field(default_factory=dict)
    full_table: torch.Tensor | None = None
    state: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.pos.shape[0]


@dataclass
class ChunkPlan:
    """The step's multi-token chunks (prefill), one op call per layer.

    The chunks cover query rows ``span[0]:span[1]``; ``rows`` int64 ``[C, 2]`` each chunk's rows
    relative to ``span[0]``; ``ctx`` int64 ``[C]`` their context lengths; ``block_table`` int32
    ``[C, M]`` (contiguous) their block-table rows; ``dense`` whether the chunks cover the span
    entirely, else ``tokens`` (absolute) and ``local`` (relative to ``span[0]``) index their rows;
    ``own_from`` / ``shared_hi`` / ``shared`` as in :class:`DecodePlan`; ``kernel`` as there."""

    span: tuple[int, int]
    rows: torch.Tensor
    ctx: torch.Tensor
    block_table: torch.Tensor
    dense: bool
    own_from: torch.Tensor
    shared_hi: torch.Tensor
    shared: bool = False
    tokens: torch.Tensor | None = None
    local: torch.Tensor | None = None
    kernel: dict = field(default_factory=dict)


@dataclass
class StepPlan:
    """One step: its decode batch and its chunks (either may be None)."""

    decode: DecodePlan | None = None
    chunks: ChunkPlan | None = None


class PlanBuilder:
    """Builds each step's :class:`StepPlan` into buffers allocated once.

    ``max_rows`` bounds the rows (requests) of a step and ``max_cols`` the block-table columns of a
    request; a step beyond them raises. Host buffers hold positions and shared-prefix bounds, the
    cache-device buffers the block tables and the device copy of the positions."""

    def __init__(self, config: MiKVConfig, layout: RegionLayout, max_rows: int, max_cols: int,
                 device: torch.device | str = "cpu") -> None:
        if max_rows <= 0 or max_cols <= 0:
            raise ValueError(f"PlanBuilder needs positive bounds, got max_rows {max_rows}, max_cols {max_cols}")
        self.config, self.layout = config, layout
        self.max_rows, self.max_cols = int(max_rows), int(max_cols)
        self.device = torch.device(device)
        host = torch.device("cpu")
        self._i64 = {name: torch.zeros(self.max_rows, dtype=torch.int64, device=host)
                     for name in ("pos", "d_own", "d_shi", "ctx", "c_own", "c_shi")}
        self._pos_dev = torch.zeros(self.max_rows if self.device.type != "cpu" else 0, dtype=torch.int64,
                                    device=self.device)
        self._rows = torch.zeros(self.max_rows, 2, dtype=torch.int64, device=host)
        self._tables: dict[str, torch.Tensor] = {}   # "decode" / "chunks": allocated at first use
        self.state: dict = {"max_rows": self.max_rows}   # op sets' persistent buffers (DecodePlan.state)

    def _check(self, rows: int, cols: int) -> None:
        if rows > self.max_rows or cols > self.max_cols:
            raise ValueError(f"MiKV step plan: {rows} rows x {cols} block columns exceed the plan bounds "
                             f"{self.max_rows} x {self.max_cols}")

    def _table(self, name: str, source: torch.Tensor, index: torch.Tensor | None, rows: int,
               cols: int) -> torch.Tensor:
        """Rows ``index`` (None: the first ``rows``) of ``source``, columns ``[0, cols)``, int32 and
        contiguous: a view of ``source`` when that already is, else a copy into the step buffer."""
        src = source[:, :cols]
        if index is None and src.dtype == torch.int32 and src[:rows].is_contiguous():
            return src[:rows]
        if name not in self._tables:
            self._tables[name] = torch.zeros(self.max_rows * self.max_cols, dtype=torch.int32, device=self.device)
        out = self._tables[name][: rows * cols].view(rows, cols)
        if src.dtype != torch.int32:
            src = src.to(torch.int32)
        if index is None:
            out.copy_(src[:rows])
        else:
            torch.index_select(src, 0, index.to(src.device), out=out)
        return out

    def _owned(self, own: torch.Tensor, shi: torch.Tensor, own_from: torch.Tensor | None,
               ctx: torch.Tensor) -> bool:
        if own_from is None or not bool((own_from > 0).any()):
            own.zero_()
            shi.zero_()
            return False
        if bool(((own_from < 0) | ((own_from > 0) & (own_from * self.layout.block_size > ctx))).any()):
            raise ValueError(f"own_from {own_from.tolist()} (block size {self.layout.block_size}) must be in "
                             f"[0, ctx // block_size] for contexts {ctx.tolist()}: a request writes only owned blocks")
        own.copy_(own_from)
        shi.copy_(shared_hi_limits(self.config, self.layout, own))
        return True

    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, table: torch.Tensor, index: torch.Tensor | None,
               own_from: torch.Tensor | None = None, token_device: torch.device | str | None = None) -> DecodePlan:
        """Plan ``B`` one-token rows: query rows ``tokens`` (int64), positions ``pos`` (int64, host),
        block-table rows ``table[index]`` (``index`` None: ``table``'s first B rows), ``own_from``
        int64 ``[B]`` or None."""
        b = pos.shape[0]
        max_pos = int(pos.max()) if b else 0
        cols = max_pos // self.layout.block_size + 1
        self._check(b, cols)
        p = self._i64["pos"][:b]
        p.copy_(pos)
        pos_dev = p if self.device.type == "cpu" else self._pos_dev[:b].copy_(p, non_blocking=True)
        own, shi = self._i64["d_own"][:b], self._i64["d_shi"][:b]
        shared = self._owned(own, shi, own_from, p)
        leading = bool(b and int(tokens[-1]) == b - 1)            # query rows 0..B-1 (tokens increasing)
        full = table[:b] if index is None else table.index_select(0, index.to(table.device))
        full = full if full.dtype == torch.int32 else full.to(torch.int32)
        return DecodePlan(tokens.to(token_device or tokens.device), p, pos_dev, max_pos,
                          self._table("decode", table, index, b, cols), leading, own, shi, shared,
                          full_table=full, state=self.state)

    def chunks(self, starts: torch.Tensor, ends: torch.Tensor, ctx: torch.Tensor, table: torch.Tensor,
               index: torch.Tensor, own_from: torch.Tensor | None = None,
               token_device: torch.device | str | None = None) -> ChunkPlan:
        """Plan ``C`` chunks of absolute query rows ``[starts[c], ends[c])`` (int64, host, increasing)
        at contexts ``ctx``, block-table rows ``table[index]``, ``own_from`` as in :meth:`decode`."""
        c = starts.shape[0]
        seq = ctx + (ends - starts)
        cols = (int(seq.max()) - 1) // self.layout.block_size + 1      # blocks holding [0, seq)
        self._check(c, cols)
        s0, s1 = int(starts[0]), int(ends[-1])
        rows = self._rows[:c]
        rows[:, 0], rows[:, 1] = starts - s0, ends - s0
        cx = self._i64["ctx"][:c]
        cx.copy_(ctx)
        own, shi = self._i64["c_own"][:c], self._i64["c_shi"][:c]
        shared = self._owned(own, shi, own_from, cx)
        dense = int((ends - starts).sum()) == s1 - s0
        tokens = local = None
        if not dense:
            local = torch.cat([torch.arange(s, e) for s, e in rows.tolist()])
            dev = token_device or table.device
            tokens, local = (local + s0).to(dev), local.to(dev)
        return ChunkPlan((s0, s1), rows, cx, self._table("chunks", table, index, c, cols), dense, own, shi,
                         shared, tokens, local)


def plan_for(config: MiKVConfig, layout: RegionLayout, block_tables: torch.Tensor, ctx_lens, own_from=None,
             rows=None) -> DecodePlan | ChunkPlan:
    """A one-off plan for direct op calls (tests, benchmarks, the legacy signatures): a
    :class:`DecodePlan` for ``ctx_lens`` (one token per request) when ``rows`` is None, else a
    :class:`ChunkPlan` for chunks ``rows`` ``[C, 2]``."""
    ctx = torch.as_tensor(ctx_lens, dtype=torch.int64).reshape(-1).cpu()
    bt = block_tables if block_tables.dim() == 2 else block_tables[None]
    of = None if own_from is None else torch.as_tensor(own_from, dtype=torch.int64).reshape(-1).cpu()
    if of is not None and of.shape[0] != ctx.shape[0]:
        raise ValueError(f"own_from has {of.shape[0]} entries for {ctx.shape[0]} rows")
    n = max(1, ctx.shape[0])
    if rows is None:
        cols = (int(ctx.max()) // layout.block_size + 1) if ctx.numel() else 1
        if bt.shape[1] < cols:
            raise ValueError(f"block table has {bt.shape[1]} columns, positions need {cols}")
        builder = PlanBuilder(config, layout, n, cols, bt.device)
        return builder.decode(torch.arange(ctx.shape[0]), ctx, bt, None, of)
    rr = torch.as_tensor(rows, dtype=torch.int64).reshape(-1, 2).cpu()
    seq = ctx + (rr[:, 1] - rr[:, 0])
    cols = (int(seq.max()) - 1) // layout.block_size + 1 if seq.numel() else 1
    if bt.shape[1] < cols:
        raise ValueError(f"block table has {bt.shape[1]} columns, the chunks need {cols}")
    builder = PlanBuilder(config, layout, n, max(1, cols), bt.device)
    plan = builder.chunks(rr[:, 0], rr[:, 1], ctx, bt, torch.arange(ctx.shape[0]), of)
    # direct calls pass q/k/v of every row; the plan's rows are relative to span[0]: keep them absolute
    plan.rows.copy_(rr)
    plan.span = (0, plan.span[1])
    return plan
