"""Worker extension: ``collective_rpc("mikv_stats")`` returns this worker's MiKV numbers.

Mixed into vLLM's worker class via ``--worker-extension-cls`` (set
automatically when a MiKV policy is active).
"""

from __future__ import annotations

from typing import Any


def _mikv_layers(static_forward_context: dict) -> dict[str, Any]:
    from .backend import MiKVAttentionImpl

    return {
        name: layer for name, layer in static_forward_context.items()
        if isinstance(getattr(layer, "impl", None), MiKVAttentionImpl)
    }


def collect_stats(static_forward_context: dict, model_dtype_size: int) -> dict[str, Any]:
    """Aggregate MiKV stats over the attention layers of one worker."""
    layers = _mikv_layers(static_forward_context)
    if not layers:
        return {"enabled": False}
    impls = [layer.impl for layer in layers.values()]
    first = impls[0]
    layout = first.layout
    out: dict[str, Any] = {
        "enabled": True,
        "policy": first.config.policy,
        "preset": first.config.name,
        "config": first.config.to_dict(),
        "num_layers": len(impls),
        "num_kv_heads": first.num_kv_heads,
        "head_dim": first.head_size,
    }
    snaps = [impl.stats.snapshot() for impl in impls]
    # every layer stores the same tokens: report them once (first layer)
    for key in ("steps", "tokens_stored", "prefill_tokens", "decode_tokens"):
        out[key] = snaps[0][key]
    sampled = [s for s in snaps if s["sampled"]]
    out["sampled_layers"] = len(sampled)
    for key in ("promoted", "demoted", "hi_tokens", "seen_tokens"):
        out[key] = sum(s[key] for s in sampled)
    out["hi_occupancy"] = out["hi_tokens"] / out["seen_tokens"] if out["seen_tokens"] else 0.0
    kv_cache = next(iter(layers.values())).kv_cache
    kv_cache = kv_cache[0] if isinstance(kv_cache, (list, tuple)) and kv_cache else kv_cache
    if layout is None and getattr(kv_cache, "ndim", 0) == 4:  # allocated, no forward pass yet
        from ..core.layout import RegionLayout

        layout = RegionLayout.build(first.config, kv_cache.shape[2], first.head_size)
    if layout is None:  # cache not allocated yet
        return out
    num_blocks = kv_cache.shape[0]
    dense = 2 * first.head_size * model_dtype_size
    out.update({
        "block_size": layout.block_size,
        "hi_slots_per_block": layout.hi_slots,
        "bytes_per_token_per_head": layout.content_bytes,
        "dense_bytes_per_token_per_head": dense,
        "capacity_ratio": dense / layout.content_bytes,
        "bits_per_element": layout.content_bytes * 8 / (2 * first.head_size),
        "breakdown": layout.breakdown(),
        "num_blocks": num_blocks,
        "capacity_tokens": num_blocks * layout.block_size,
    })
    return out


class MiKVWorkerExtension:
    """Methods callable with ``collective_rpc`` on every worker."""

    def mikv_stats(self) -> dict[str, Any]:
        import torch

        ctx = self.compilation_config.static_forward_context
        dtype_size = torch.empty((), dtype=self.model_config.dtype).element_size()
        out = collect_stats(ctx, dtype_size)
        out["rank"] = getattr(self, "rank", 0)
        out.update(parallel_info(self.parallel_config, self.model_config))
        return out


def parallel_info(parallel_config, model_config) -> dict[str, int]:
    """Where this worker sits: TP/PP rank and size, and how many TP ranks hold copies of its KV heads.

    vLLM shards KV heads over TP ranks and, when TP exceeds the model's KV heads,
    gives each head to ``tp_size // total_kv_heads`` consecutive ranks (replicas).
    """
    from vllm.distributed import parallel_state as ps

    tp_size = int(parallel_config.tensor_parallel_size)
    pp_size = int(parallel_config.pipeline_parallel_size)
    total_kv = int(model_config.get_total_num_kv_heads())
    return {
        "tp_rank": ps.get_tp_group().rank_in_group if tp_size > 1 else 0,
        "tp_size": tp_size,
        "pp_rank": ps.get_pp_group().rank_in_group if pp_size > 1 else 0,
        "pp_size": pp_size,
        "kv_head_replicas": max(1, tp_size // total_kv),
    }
