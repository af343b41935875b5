"""MiKV attention backend for vLLM (registered under the CUSTOM slot).

One file, vLLM-style: Backend (capabilities and page size), MetadataBuilder
(per-step request rows on the host) and Impl (store + two-tier attention +
score accumulation + hi-slot maintenance, one impl per layer). The page of
every (block, KV head) is a :class:`~mikv_vllm.core.layout.RegionLayout`; the
computation is :mod:`mikv_vllm.core.reference` (torch) or the Triton kernels
on CUDA.
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
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from ..config import MiKVConfig
from ..core.layout import RegionLayout, as_regions
from .stats import LayerStats

logger = logging.getLogger("vllm.mikv")  # child of vLLM's configured logger

# customize_spec() runs without a config context (vLLM calls it through the
# worker wrapper); the impls, built earlier during model construction, publish
# the engine's MiKV config here.
_ACTIVE: dict[str, MiKVConfig] = {}
_ACTIVE_LOCK = threading.Lock()


def active_config() -> MiKVConfig:
    """The MiKV config of this process's engine (raises if none is set)."""
    with _ACTIVE_LOCK:
        config = _ACTIVE.get("config")
    if config is None:
        vllm_config = get_current_vllm_config_or_none()
        if vllm_config is not None:
            config = MiKVConfig.from_additional_config(vllm_config.additional_config)
    if config is None:
        raise RuntimeError(
            "MiKV attention backend selected but no kv_cache_policy is set in additional_config; "
            "start vLLM with --kv-cache-policy (or additional_config={'kv_cache_policy': ...})")
    return config


def _publish(config: MiKVConfig) -> None:
    with _ACTIVE_LOCK:
        if _ACTIVE.get("config") not in (None, config):
            raise RuntimeError(f"conflicting MiKV configs in one process: {_ACTIVE['config']} vs {config}")
        _ACTIVE["config"] = config


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
        """Declare the compressed bytes per token so vLLM fits more blocks."""
        if spec.head_size_v != spec.head_size:
            raise ValueError(f"MiKV needs equal K/V head sizes, got {spec.head_size}/{spec.head_size_v}")
        layout = RegionLayout.build(active_config(), spec.block_size, spec.head_size)
        elem = torch.empty((), dtype=spec.dtype).element_size()
        if layout.content_bytes % elem:
            raise ValueError(f"MiKV page content {layout.content_bytes} B is not a multiple of {spec.dtype}")
        return dataclasses.replace(spec, state_content_bytes=layout.content_bytes)


@dataclass
class MiKVMetadata:
    """Host-side rows of one step: request i owns query rows
    ``query_start_loc[i]:query_start_loc[i+1]`` and has ``seq_lens[i]`` tokens
    (context + new)."""

    num_actual_tokens: int
    query_start_loc: list[int]
    seq_lens: list[int]
    block_table: torch.Tensor
    slot_mapping: torch.Tensor


class MiKVMetadataBuilder(AttentionMetadataBuilder[MiKVMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        config = MiKVConfig.from_additional_config(vllm_config.additional_config)
        if config is None:
            raise RuntimeError("MiKV backend built without kv_cache_policy in additional_config")
        if vllm_config.cache_config.enable_prefix_caching:
            raise RuntimeError("MiKV needs prefix caching off (blocks must belong to one request)")
        if vllm_config.speculative_config is not None:
            raise RuntimeError("MiKV does not support speculative decoding")

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> MiKVMetadata:
        m = common_attn_metadata
        n = m.num_reqs
        return MiKVMetadata(
            num_actual_tokens=m.num_actual_tokens,
            query_start_loc=m.query_start_loc_cpu[: n + 1].tolist(),
            seq_lens=m.seq_lens[:n].cpu().tolist(),
            block_table=m.block_table_tensor[:n],
            slot_mapping=m.slot_mapping,
        )


class MiKVAttentionImpl(AttentionImpl[MiKVMetadata]):
    _layout_logged: ClassVar[bool] = False  # log the page layout once per process

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
        config = MiKVConfig.from_additional_config(get_current_vllm_config().additional_config)
        if config is None:
            raise RuntimeError("MiKV backend selected but no kv_cache_policy in additional_config")
        config.validate(head_size)
        _publish(config)
        self.config = config
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.kv_cache_dtype = kv_cache_dtype
        self.layout: RegionLayout | None = None
        self.ops = None  # chosen with the layout, on the first forward
        self.stats = LayerStats()

    def _layout_for(self, kv_cache: torch.Tensor) -> RegionLayout:
        if self.layout is None:
            from ..kernels import get_ops

            self.ops = get_ops(kv_cache.device)  # Triton on CUDA, core.reference (torch) elsewhere
            block_size = kv_cache.shape[2]
            layout = RegionLayout.build(self.config, block_size, self.head_size)
            as_regions(kv_cache, layout)  # self-check: page bytes match the layout
            self.layout = layout
            if not MiKVAttentionImpl._layout_logged:
                MiKVAttentionImpl._layout_logged = True
                logger.info("MiKV layout: block %d, %d B/token/head (%s), ops %s", block_size,
                            layout.content_bytes, layout.breakdown(), getattr(self.ops, "__name__", self.ops))
        return self.layout

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("MiKV attention does not support fused output quantization")
        if attn_metadata is None:  # profiling run
            return output
        layout = self._layout_for(kv_cache)
        regions = as_regions(kv_cache, layout)
        n_tok = attn_metadata.num_actual_tokens
        q_all = query[:n_tok].view(n_tok, self.num_heads, self.head_size)
        k_all = key[:n_tok].view(n_tok, self.num_kv_heads, self.head_size)
        v_all = value[:n_tok].view(n_tok, self.num_kv_heads, self.head_size)
        out = output[:n_tok].view(n_tok, self.num_heads, self.head_size)
        qsl, seq_lens = attn_metadata.query_start_loc, attn_metadata.seq_lens
        n = layout.block_size
        probe = self.stats.begin_step(layer, regions, layout, attn_metadata)  # stats (see stats.py)
        decode_rows, decode_ctx = [], []
        for i, seq_len in enumerate(seq_lens):
            start, end = qsl[i], qsl[i + 1]
            if end <= start:
                continue
            ctx = seq_len - (end - start)
            if end - start == 1 and ctx > 0:   # decode: one batched step for all of them, below
                decode_rows.append(i)
                decode_ctx.append(ctx)
                continue
            row = attn_metadata.block_table[i, : (seq_len + n - 1) // n]
            result = self.ops.forward_request(
                regions, layout, self.config, row, ctx,
                q_all[start:end], k_all[start:end], v_all[start:end], self.scale)
            out[start:end] = result.to(out.dtype)
        if decode_rows:
            rows = torch.tensor(decode_rows, device=attn_metadata.block_table.device)
            tok = torch.tensor([qsl[i] for i in decode_rows], device=query.device)
            max_blocks = (max(decode_ctx) + n) // n   # blocks holding positions [0, ctx] of the longest
            result = self.ops.forward_decode(
                regions, layout, self.config, attn_metadata.block_table[rows, :max_blocks], decode_ctx,
                q_all[tok], k_all[tok], v_all[tok], self.scale)
            out[tok] = result.to(out.dtype)
        self.stats.end_step(probe, regions, layout, attn_metadata)  # stats (see stats.py)
        return output
