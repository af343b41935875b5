"""MiKV attention backend for vLLM (registered under the CUSTOM slot).

One file, vLLM-style: Backend (capabilities and page size), MetadataBuilder
(per-step request rows on the host) and Impl (store + two-tier attention +
score accumulation + hi-slot maintenance, one impl per layer). The page of
every (block, KV head) is a :class:`~mikv_vllm.core.layout.RegionLayout`; the
computation is an op set of :mod:`mikv_vllm.ops` (the fused C++ op on CPU, the Triton kernels
on CUDA, batched torch with ``MIKV_VLLM_OPS=torch``). The builder makes the step's plan once
(:class:`~mikv_vllm.ops.StepPlan`: rows, positions, block tables, shared-prefix bounds, the op
set's launch plan) in buffers reused across steps; every layer reads it. With prefix caching,
each row's first owned block (``own_from``, from :mod:`.sharing`) is in the plan: blocks before
it are shared and only read.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.config import get_current_vllm_config, get_current_vllm_config_or_none
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from ..config import MiKVConfig
from ..core.layout import RegionLayout, as_regions
from ..core.rotation import rotation_for
from ..kernels import reserve_workspace, use_triton, workspace_bytes
from ..ops import ChunkPlan, DecodePlan, MiKVOps, PlanBuilder, StepPlan, get_ops
from . import sharing
from .stats import LayerStats, step_token_counts

logger = logging.getLogger("vllm.mikv")  # child of vLLM's configured logger

# customize_spec() may run without a config context (vLLM calls it through the worker wrapper
# once the model is built). The impls of the model just built record their engine's config here;
# the latest engine built in this process wins, so engines built one after another in one process
# (offline use, the eval harness) each see their own preset.
_LAST_BUILT: dict[str, MiKVConfig] = {}
_LAST_BUILT_LOCK = threading.Lock()


def active_config() -> MiKVConfig:
    """The MiKV config of the engine being set up: the current vLLM config context's, else the
    one recorded by the most recently built MiKV impls of this process (raises if neither)."""
    vllm_config = get_current_vllm_config_or_none()
    config = MiKVConfig.from_additional_config(vllm_config.additional_config) if vllm_config else None
    if config is None:
        with _LAST_BUILT_LOCK:
            config = _LAST_BUILT.get("config")
    if config is None:
        raise RuntimeError(
            "MiKV attention backend selected but no kv_cache_policy is set in additional_config; "
            "start vLLM with --kv-cache-policy (or additional_config={'kv_cache_policy': ...})")
    return config


def _publish(config: MiKVConfig) -> None:
    with _LAST_BUILT_LOCK:
        _LAST_BUILT["config"] = config


class MiKVAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]

    @staticmethod
    def get_name() -> str:
        # Must be an existing AttentionBackendEnum member (vLLM indexes by it).
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type["MiKVAttentionImpl"]:
        return MiKVAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["MiKVMetadataBuilder"]:
        return MiKVMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBHNC,)  # each (block, head) region is contiguous

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size % 8 == 0

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """Declare the compressed bytes per token so vLLM fits more blocks. The page is bytes
        (``dtype`` uint8, as vLLM's own packed caches): C needs no rounding to the model dtype."""
        if spec.head_size_v != spec.head_size:
            raise ValueError(f"MiKV needs equal K/V head sizes, got {spec.head_size}/{spec.head_size_v}")
        layout = RegionLayout.build(active_config(), spec.block_size, spec.head_size)
        return dataclasses.replace(spec, state_content_bytes=layout.content_bytes, dtype=torch.uint8)


@dataclass
class MiKVMetadata:
    """One step: the :class:`~mikv_vllm.ops.StepPlan` parts every layer reads, built once by
    :class:`MiKVMetadataBuilder`. Request i owns query rows ``query_start_loc[i]:query_start_loc[i+1]``
    and has ``seq_lens[i]`` tokens (context + new). ``decode``: the one-token rows, batched
    (:class:`~mikv_vllm.ops.DecodePlan`); ``prefill``: the multi-token chunks
    (:class:`~mikv_vllm.ops.ChunkPlan`), also listed in ``chunks`` as ``(request, start, end, ctx)``;
    ``own_from``: per request its first owned block (None: all 0). ``serial``: set instead of
    ``decode`` / ``prefill`` in a step where a row reads shared blocks that another row writes in the
    same step (a hit on blocks scheduled in this step): every row as ``(request, start, end, ctx)``,
    writers before their readers, run one at a time. ``ops``: the op set the plan was prepared for."""

    num_actual_tokens: int
    query_start_loc: list[int]
    seq_lens: list[int]
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    decode: DecodePlan | None = None
    chunks: list[tuple[int, int, int, int]] = dataclasses.field(default_factory=list)
    token_counts: tuple[int, int, int] = (0, 0, 0)   # (stored, prefill, decode) tokens, stats.step_token_counts
    own_from: list[int] | None = None
    serial: list[tuple[int, int, int, int]] | None = None
    prefill: ChunkPlan | None = None
    ops: MiKVOps | None = None


class MiKVMetadataBuilder(AttentionMetadataBuilder[MiKVMetadata]):
    # CUDA graphs: pure-decode batches are captured whole on the Triton op set (kernels/step.py:
    # fixed launches on persistent buffers, padded rows are no-ops, no host read in a layer); other
    # op sets (torch, C++) plan and sync on the host and stay eager (NEVER, get_cudagraph_support).
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        from vllm.platforms import current_platform

        return cls._cudagraph_support if use_triton(current_platform.device_type) else AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        config = MiKVConfig.from_additional_config(vllm_config.additional_config)
        if config is None:
            raise RuntimeError("MiKV backend built without kv_cache_policy in additional_config")
        if vllm_config.speculative_config is not None:
            raise RuntimeError("MiKV does not support speculative decoding")
        self.prefix_caching = bool(vllm_config.cache_config.enable_prefix_caching)
        if self.prefix_caching:
            sharing.install()   # records each request's shared prefix at admission (worker side)
        model = vllm_config.model_config
        block_size = kv_cache_spec.block_size
        self.init_plans(config, block_size, kv_cache_spec.head_size,
                        model.get_num_attention_heads(vllm_config.parallel_config), kv_cache_spec.num_kv_heads,
                        max_rows=vllm_config.scheduler_config.max_num_seqs,
                        max_cols=-(-model.max_model_len // block_size), device=device)

    def init_plans(self, config: MiKVConfig, block_size: int, head_size: int, num_heads: int, num_kv_heads: int,
                   max_rows: int, max_cols: int, device) -> None:
        """The step-plan buffers (sized by the engine's bounds) and the op set the plans are for."""
        self.config, self.block_size = config, block_size
        self.layout = RegionLayout.build(config, block_size, head_size)
        self.heads = (num_heads, num_kv_heads)
        self.plans = PlanBuilder(config, self.layout, max_rows, max_cols, device)
        self.ops = get_ops(device)
        self.capturable = use_triton(device)   # the Triton op set: decode rows keep vLLM's padding

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata) -> MiKVMetadata:
        """A capture batch (one token per row, padded rows at seq_len 0): built as every decode
        step, into the same persistent buffers, so the graph replays on the next steps' metadata."""
        m = common_attn_metadata
        if m.max_query_len > 1:
            raise RuntimeError(f"MiKV captures uniform single-token decode only, got max_query_len {m.max_query_len}")
        return self.build(0, m)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> MiKVMetadata:
        m = common_attn_metadata
        n = m.num_reqs
        qsl = m.query_start_loc_cpu[: n + 1].to(torch.int64)
        host_seq = getattr(m, "seq_lens_cpu_upper_bound", None)   # exact without speculative decoding (refused at start)
        seq = (host_seq[:n] if host_seq is not None else m.seq_lens[:n]).to("cpu", torch.int64)
        qlen = qsl[1:] - qsl[:-1]
        ctx = seq - qlen
        own = self._own_from(n, seq)
        table, dev = m.block_table_tensor, m.query_start_loc.device
        plan = StepPlan()
        uniform = getattr(self, "capturable", False) and n and getattr(m, "max_query_len", 2) <= 1
        if uniform:
            # uniform decode (what vLLM captures): every row, padded ones (seq_len 0) included, row i =
            # query token i; pos = seq_len - 1 (-1: padding, a no-op in every kernel). Never serial (a
            # graph replay runs the batched step): its launches store every row's token before any row
            # attends, so a same-step hit reads the writer's new token (docs/design.md "Shared blocks")
            one = multi = torch.zeros(0, dtype=torch.int64)
            plan.decode = self.plans.decode(torch.arange(n), seq - 1, table, None, own, token_device=dev)
        else:
            one = torch.nonzero(qlen == 1).flatten()
            multi = torch.nonzero(qlen > 1).flatten()
        if one.numel():
            leading = int(one[-1]) == one.numel() - 1             # rows 0..B-1: no gather of the table
            plan.decode = self.plans.decode(qsl[one], ctx[one], table, None if leading else one,
                                            None if own is None else own[one], token_device=dev)
        if multi.numel():
            plan.chunks = self.plans.chunks(qsl[multi], qsl[multi + 1], ctx[multi], table, multi,
                                            None if own is None else own[multi], token_device=dev)
        meta = MiKVMetadata(
            num_actual_tokens=m.num_actual_tokens,
            query_start_loc=qsl.tolist(),
            seq_lens=seq.tolist(),
            block_table=table[:n],
            slot_mapping=m.slot_mapping,
            decode=plan.decode,
            chunks=[(i, int(qsl[i]), int(qsl[i + 1]), int(ctx[i])) for i in multi.tolist()],
            token_counts=step_token_counts(qlen),
            prefill=plan.chunks,
            ops=self.ops,
        )
        if own is not None:
            meta.own_from = own.tolist()
        if own is not None and not uniform:
            order = writers_first(meta.own_from, ctx.tolist(), meta.seq_lens, table[:n].cpu(), self.block_size)
            if order is not None:
                qs = meta.query_start_loc
                meta.serial = [(i, qs[i], qs[i + 1], int(ctx[i])) for i in order]
                meta.decode, meta.chunks, meta.prefill = None, [], None
                return meta
        self.ops.prepare(plan, self.layout, self.config, *self.heads)
        return meta

    def _own_from(self, n: int, seq: torch.Tensor) -> torch.Tensor | None:
        """Each row's first owned block (int64 ``[n]``) from the tokens it was admitted with
        (:mod:`.sharing`; rows past those recorded must be a captured batch's padding, ``seq`` 0:
        they own from block 0); None when nothing is shared (or in dummy / profiling runs)."""
        if not getattr(self, "prefix_caching", False):
            return None
        admitted = sharing.step_rows()
        if admitted is None:          # dummy / profiling run: nothing is shared
            return None
        if len(admitted) < n and not bool(seq[len(admitted):n].any()):
            admitted = list(admitted) + [0] * (n - len(admitted))
        if len(admitted) != n:
            raise RuntimeError(f"MiKV prefix caching: {len(admitted)} admitted rows recorded for {n} request rows")
        own = torch.tensor(admitted, dtype=torch.int64) // self.block_size
        return own if bool(own.any()) else None


def writers_first(own_from: list[int], ctx: list[int], seq: list[int], table: torch.Tensor,
                  block_size: int) -> list[int] | None:
    """Row order in which every row runs after the rows that write its shared blocks this step, or
    None when no row's shared blocks are written (the normal case: chunks, then the decode batch).

    Row j's shared blocks are ``table[j, :own_from[j]]``; row i writes ``table[i, ctx[i] // N:
    ceil(seq[i] / N)]``. A hit on blocks that are still being filled happens only in the step that
    fills them (vLLM caches a block when it schedules the tokens that fill it); the writer was
    scheduled before the reader, so the order always exists (Kahn's algorithm).
    """
    n = len(own_from)
    readers = [j for j in range(n) if own_from[j]]
    written = [set(table[i, ctx[i] // block_size:(seq[i] + block_size - 1) // block_size].tolist())
               for i in range(n)]
    deps = {j: {i for i in range(n) if i != j and written[i] & set(table[j, :own_from[j]].tolist())}
            for j in readers}
    if not any(deps.values()):
        return None
    order, done = [], set()
    while len(order) < n:
        ready = [i for i in range(n) if i not in done and deps.get(i, set()) <= done]
        if not ready:
            raise RuntimeError(f"MiKV prefix caching: rows read each other's new blocks ({deps})")
        order += ready
        done.update(ready)
    return order


def current_device_type() -> str:
    from vllm.platforms import current_platform

    return current_platform.device_type


def decode_buffer_bytes(*args) -> int:
    """``kernels.step.decode_buffer_bytes`` (imported only where triton is)."""
    from ..kernels.step import decode_buffer_bytes as nbytes

    return nbytes(*args)


def load_ops_at_start() -> None:
    """Load this platform's op set now, as vLLM builds the model (engine start, before /health): on CPU
    the C++ op is imported, or built (logged) when no build exists, so no request waits for a compiler
    and a build failure is a startup error."""
    from vllm.platforms import current_platform

    get_ops(current_platform.device_type)


class MiKVAttentionImpl(AttentionImpl[MiKVMetadata]):
    _layout_logged: ClassVar[bool] = False  # log the page layout once per process
    _fallback_logged: ClassVar[bool] = False  # log a rotation fallback once per process

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes=None, sliding_window=None, kv_cache_dtype: str = "auto",
                 logits_soft_cap=None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, **extra) -> None:
        unsupported = {
            "alibi_slopes": alibi_slopes is not None,
            "sliding_window": sliding_window is not None,
            "logits_soft_cap": bool(logits_soft_cap),
            "attn_type != decoder": attn_type != AttentionType.DECODER,
            "kv sharing": kv_sharing_target_layer_name is not None,
            "attention sinks": extra.get("sinks") is not None,
            "kv_cache_dtype != auto": kv_cache_dtype != "auto",
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise NotImplementedError(f"MiKV attention does not support: {', '.join(bad)}")
        vllm_config = get_current_vllm_config()
        config = MiKVConfig.from_additional_config(vllm_config.additional_config)
        if config is None:
            raise RuntimeError("MiKV backend selected but no kv_cache_policy in additional_config")
        config, fallback = config.for_head_dim(head_size)
        if fallback and not MiKVAttentionImpl._fallback_logged:   # once per process, not per layer
            MiKVAttentionImpl._fallback_logged = True
            logger.warning(fallback)
        _publish(config)
        self.config = config
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.kv_cache_dtype = kv_cache_dtype
        self.rotation = rotation_for(head_size) if config.rotation else None  # core.rotation
        self.layout: RegionLayout | None = None
        self.stats = LayerStats()
        load_ops_at_start()
        # the Triton decode step's persistent buffers (made at the first step, after vLLM sized the
        # KV cache): reserved with the workspace in the profiling run so the memory profile leaves them free
        self.decode_reserve = 0
        if use_triton(current_device_type()) and vllm_config.model_config is not None:   # None: no engine
            self.decode_reserve = decode_buffer_bytes(
                num_heads, self.num_kv_heads, head_size, vllm_config.scheduler_config.max_num_seqs,
                vllm_config.model_config.max_model_len + 256, config.hi_ratio > 0, config.rotation)

    def _layout_for(self, kv_cache: torch.Tensor, ops: MiKVOps) -> RegionLayout:
        if self.layout is None:
            block_size = kv_cache.shape[2]
            layout = RegionLayout.build(self.config, block_size, self.head_size)
            as_regions(kv_cache, layout)  # self-check: page bytes match the layout
            self.layout = layout
            if not MiKVAttentionImpl._layout_logged:
                MiKVAttentionImpl._layout_logged = True
                logger.info("MiKV layout: block %d, %d B/token/head (%s), ops %s", block_size,
                            layout.content_bytes, layout.breakdown(), ops.__name__)
        return self.layout

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("MiKV attention does not support fused output quantization")
        if attn_metadata is None:  # profiling run: attention is skipped, reserve the Triton workspace
            if use_triton(query.device):
                reserve_workspace(query.device, workspace_bytes() + getattr(self, "decode_reserve", 0))
            return output
        ops = attn_metadata.ops   # the op set the builder planned this step for
        layout = self._layout_for(kv_cache, ops)
        regions = as_regions(kv_cache, layout)
        n_tok = attn_metadata.num_actual_tokens
        q_all = query[:n_tok].view(n_tok, self.num_heads, self.head_size)
        k_all = key[:n_tok].view(n_tok, self.num_kv_heads, self.head_size)
        v_all = value[:n_tok].view(n_tok, self.num_kv_heads, self.head_size)
        out = output[:n_tok].view(n_tok, self.num_heads, self.head_size)
        dec = attn_metadata.decode
        rows_all = attn_metadata.prefill is not None or attn_metadata.serial or (dec is not None and not dec.leading)
        if self.rotation is not None and rows_all:   # the page and the ops see rotated heads; q.k is unchanged
            q_all, k_all, v_all = (self.rotation.rotate(x) for x in (q_all, k_all, v_all))
        # stats read pages on the host: not inside a CUDA-graph capture (replays skip them)
        capturing = query.is_cuda and torch.cuda.is_current_stream_capturing()
        probe = None if capturing else self.stats.begin_step(layer, regions, layout, attn_metadata)
        pre = attn_metadata.prefill
        if pre is not None:   # every multi-token chunk (prefill) in one call
            s0, s1 = pre.span
            result = ops.chunks(regions, layout, self.config, pre, q_all[s0:s1], k_all[s0:s1], v_all[s0:s1],
                                self.scale)
            if pre.dense:
                out[s0:s1] = result.to(out.dtype)
            else:
                out[pre.tokens] = result[pre.local].to(out.dtype)
        own, n = attn_metadata.own_from, layout.block_size
        for i, start, end, ctx in attn_metadata.serial or []:   # shared blocks written this step: writers first
            row = attn_metadata.block_table[i, : (ctx + end - start + n - 1) // n]
            result = ops.request(regions, layout, self.config, row, ctx, q_all[start:end], k_all[start:end],
                                 v_all[start:end], self.scale, own_from=own[i])
            out[start:end] = result.to(out.dtype)
        if dec is not None:   # every one-token row (decode and context 0) in one batched step
            if dec.leading:   # rows 0..B-1 (B may count a captured batch's padded rows)
                b = dec.size
                if rows_all:   # a mixed step: q_all (rotated) covers the rows
                    q, k, v = q_all[:b], k_all[:b], v_all[:b]
                else:          # decode only: the rows straight from the inputs (no n_tok slice)
                    q = query[:b].view(b, self.num_heads, self.head_size)
                    k = key[:b].view(b, self.num_kv_heads, self.head_size)
                    v = value[:b].view(b, self.num_kv_heads, self.head_size)
            else:
                q, k, v = q_all[dec.tokens], k_all[dec.tokens], v_all[dec.tokens]
            if dec.leading and self.rotation is not None and not rows_all:   # model-space rows: the op set
                result = ops.decode_rotated(regions, layout, self.config, dec, q, k, v, self.scale, self.rotation)
            else:                                                            # rotates (Triton: in its kernels)
                result = ops.decode(regions, layout, self.config, dec, q, k, v, self.scale)
            if dec.leading:
                output[: dec.size].view(dec.size, self.num_heads, self.head_size).copy_(result)
            else:
                out[dec.tokens] = result.to(out.dtype)
        if self.rotation is not None and rows_all:   # outputs back from the rotated value space
            out.copy_(self.rotation.unrotate(out))
        if not capturing:
            self.stats.end_step(probe, regions, layout, attn_metadata)  # stats (see stats.py)
        return output
