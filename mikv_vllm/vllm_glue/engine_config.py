"""Apply a MiKV policy when vLLM builds its engine config.

Wraps ``EngineArgs.create_engine_config`` (CLI and offline ``LLM`` paths): when
``additional_config`` names a ``kv_cache_policy``, it validates the MiKV config,
selects the CUSTOM (MiKV) attention backend, turns prefix caching off, adds the
stats worker extension, and rejects what MiKV cannot support with one clear error.
"""

from __future__ import annotations

import logging

from ..config import MiKVConfig
from . import WORKER_EXTENSION

logger = logging.getLogger("vllm.mikv")  # child of vLLM's configured logger
_installed = False


class MiKVUnsupportedError(ValueError):
    """A vLLM setting or model feature that the MiKV policy cannot serve."""


def prepare_engine_args(engine_args) -> MiKVConfig | None:
    """Normalise ``engine_args`` for the policy in its additional_config (in place)."""
    config = MiKVConfig.from_additional_config(engine_args.additional_config)
    if config is None:
        return None
    engine_args.additional_config = {
        **engine_args.additional_config,
        "kv_cache_policy": config.policy,
        "mikv": config.to_dict(),
    }
    backend = engine_args.attention_backend
    backend_name = getattr(backend, "name", backend)
    if backend_name not in (None, "CUSTOM", "custom"):
        raise MiKVUnsupportedError(
            f"--kv-cache-policy {config.policy} uses the MiKV attention backend; "
            f"--attention-backend {backend_name} conflicts with it")
    engine_args.attention_backend = "CUSTOM"
    if engine_args.enable_prefix_caching is not False:
        logger.info("MiKV: prefix caching turned off (hi-precision state is per request)")
    engine_args.enable_prefix_caching = False
    if engine_args.speculative_config:
        raise MiKVUnsupportedError("--kv-cache-policy does not support speculative decoding")
    if engine_args.kv_cache_dtype not in ("auto", None):
        raise MiKVUnsupportedError(
            f"--kv-cache-policy stores its own formats; --kv-cache-dtype must be 'auto', "
            f"got {engine_args.kv_cache_dtype!r}")
    ext = engine_args.worker_extension_cls
    if not ext:
        engine_args.worker_extension_cls = WORKER_EXTENSION
    elif ext != WORKER_EXTENSION:
        logger.warning("MiKV: custom worker extension %s set; /mikv/stats needs %s", ext, WORKER_EXTENSION)
    return config


def check_model(vllm_config, config: MiKVConfig) -> None:
    """Reject model features MiKV has no path for."""
    model = vllm_config.model_config
    if getattr(model, "use_mla", False):
        raise MiKVUnsupportedError("MiKV does not support MLA attention models")
    if model.get_sliding_window() is not None:
        raise MiKVUnsupportedError("MiKV does not support sliding-window attention layers")
    if getattr(model, "is_encoder_decoder", False):
        raise MiKVUnsupportedError("MiKV does not support encoder-decoder models")
    head_dim = model.get_head_size()
    config.validate(head_dim)
    hf_text = model.hf_text_config
    head_dim_v = getattr(hf_text, "v_head_dim", None)
    if head_dim_v not in (None, head_dim):
        raise MiKVUnsupportedError(f"MiKV needs equal K/V head sizes, got {head_dim} and {head_dim_v}")
    from .backend import MiKVAttentionBackend

    if not MiKVAttentionBackend.supports_head_size(head_dim):
        raise MiKVUnsupportedError(f"MiKV needs head_dim divisible by 8, got {head_dim}")


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config

    def create_engine_config(self, *args, **kwargs):
        config = prepare_engine_args(self)
        vllm_config = original(self, *args, **kwargs)
        if config is not None:
            check_model(vllm_config, config)
            logger.info("MiKV policy %s active: %s", config.policy, config.to_dict())
        return vllm_config

    EngineArgs.create_engine_config = create_engine_config
