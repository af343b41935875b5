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
        "config": first.config.to_dict(),
        "num_layers": len(impls),
        "num_kv_heads": first.num_kv_heads,
        "head_dim": first.head_size,
    }
    totals = {k: 0 for k in ("tokens_stored", "prefill_tokens", "decode_tokens", "demoted", "promoted",
                             "hi_tokens", "seen_tokens", "steps")}
    for impl in impls:
        for key in totals:
            totals[key] += getattr(impl.stats, key)
    out.update(totals)
    out["hi_occupancy"] = totals["hi_tokens"] / totals["seen_tokens"] if totals["seen_tokens"] else 0.0
    if layout is None:  # no forward pass yet
        return out
    kv_cache = next(iter(layers.values())).kv_cache
    kv_cache = kv_cache[0] if isinstance(kv_cache, (list, tuple)) else kv_cache
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
        return collect_stats(ctx, dtype_size)
