"""Apply a MiKV policy when vLLM builds its engine config.

Wraps ``EngineArgs.create_engine_config`` (CLI and offline ``LLM`` paths): when
``additional_config`` names a ``kv_cache_policy``, it validates the MiKV config,
selects the CUSTOM (MiKV) attention backend, decides prefix caching (:func:`prefix_caching`), adds the
stats worker extension, and rejects what MiKV cannot support with one clear error:
at config time (model features, TP sizes that cannot split the KV heads) and once the
workers report their KV cache specs (a worker, e.g. on another node, without the MiKV layout).
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
    engine_args.enable_prefix_caching = prefix_caching(config, engine_args.enable_prefix_caching)
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


def prefix_caching(config: MiKVConfig, requested: bool | None) -> bool:
    """Whether the engine caches prefixes under this policy: as stock vLLM (on unless
    ``--no-enable-prefix-caching``) where a shared block can be read (docs/design.md, "Shared
    blocks"; every op set: torch, C++, Triton); off, with a log line, where it cannot; an
    explicit ``--enable-prefix-caching`` there raises.

    Not shareable: lo_bits 0 (eviction: a reader would see only the prefix's sinks).
    """
    if requested is False:
        return False
    if config.has_lo:
        logger.info("MiKV: prefix caching on (shared blocks are read-only: lo copies + sink hi copies)")
        return True
    reason = f"policy {config.policy} keeps no lo copies (evicted tokens cannot be shared)"
    if requested:
        raise MiKVUnsupportedError(f"--enable-prefix-caching with --kv-cache-policy {config.policy}: {reason}")
    logger.info("MiKV: prefix caching turned off: %s", reason)
    return False


def check_model(vllm_config, config: MiKVConfig) -> None:
    """Reject model features MiKV has no path for."""
    model = vllm_config.model_config
    if getattr(model, "use_mla", False):
        raise MiKVUnsupportedError("MiKV does not support MLA attention models")
    if model.get_sliding_window() is not None:
        raise MiKVUnsupportedError("MiKV does not support sliding-window attention layers")
    if getattr(model, "is_encoder_decoder", False):
        raise MiKVUnsupportedError("MiKV does not support encoder-decoder models")
    check_tensor_parallel(model.model_arch_config.total_num_attention_heads, model.get_total_num_kv_heads(),
                          vllm_config.parallel_config.tensor_parallel_size)
    head_dim = model.get_head_size()
    config.validate(head_dim)
    hf_text = model.hf_text_config
    head_dim_v = getattr(hf_text, "v_head_dim", None)
    if head_dim_v not in (None, head_dim):
        raise MiKVUnsupportedError(f"MiKV needs equal K/V head sizes, got {head_dim} and {head_dim_v}")
    from .backend import MiKVAttentionBackend

    if not MiKVAttentionBackend.supports_head_size(head_dim):
        raise MiKVUnsupportedError(f"MiKV needs head_dim divisible by 8, got {head_dim}")


def check_tensor_parallel(num_heads: int, num_kv_heads: int, tp_size: int) -> None:
    """Each MiKV page belongs to one KV head on one rank, so TP must split the KV heads
    evenly (TP divides them) or replicate them evenly (TP a multiple of them).

    vLLM itself checks only the query heads and, for KV heads, fails later inside
    each worker with a bare ``AssertionError``; this says it up front, with the sizes that work.
    """
    if tp_size <= 1:
        return
    if (num_kv_heads % tp_size if tp_size <= num_kv_heads else tp_size % num_kv_heads) == 0:
        return
    valid = [t for t in range(1, num_heads + 1)
             if num_heads % t == 0 and (num_kv_heads % t == 0 or t % num_kv_heads == 0)]
    raise MiKVUnsupportedError(
        f"--tensor-parallel-size {tp_size} cannot split the model's {num_kv_heads} KV heads: the MiKV "
        f"cache is kept per KV head on the rank that owns it, so the TP size must divide the KV heads "
        f"or be a multiple of them (and divide the {num_heads} attention heads); "
        f"valid sizes for this model: {valid}")


def check_worker_specs(config: MiKVConfig, worker_specs: list[dict]) -> None:
    """Every worker's attention layers must carry this config's MiKV pages.

    A worker that does not was built from other flags: ``vllm serve --headless`` (the
    other nodes of a multi-node deployment) builds its config from its own command
    line. vLLM only compares specs of the same layer (tensor parallelism); pipeline
    stages on a node started without the MiKV flags would serve a stock cache.
    """
    from vllm.v1.kv_cache_interface import AttentionSpec

    from ..core.layout import RegionLayout

    bad: dict[int, str] = {}
    for rank, specs in enumerate(worker_specs):
        for name, spec in specs.items():
            if not isinstance(spec, AttentionSpec):
                continue
            want = RegionLayout.build(config, spec.block_size, spec.head_size).content_bytes
            if spec.state_content_bytes != want:
                bad[rank] = f"{name}: {spec.state_content_bytes} B/token/head, MiKV {config.name} needs {want}"
                break
    if bad:
        detail = "; ".join(f"worker {rank} {msg}" for rank, msg in bad.items())
        raise MiKVUnsupportedError(
            f"kv_cache_policy={config.policy} is active but {len(bad)} of {len(worker_specs)} workers hold "
            f"another KV cache layout ({detail}). Start every node with the same --kv-cache-policy / "
            f"--mikv-* flags (vllm serve --headless builds its config from its own command line).")


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.executor.abstract import Executor

    original_specs = Executor.get_kv_cache_specs

    def get_kv_cache_specs(self):
        worker_specs = original_specs(self)
        config = MiKVConfig.from_additional_config(self.vllm_config.additional_config)
        if config is not None:
            check_worker_specs(config, worker_specs)
        return worker_specs

    Executor.get_kv_cache_specs = get_kv_cache_specs

    original = EngineArgs.create_engine_config

    def create_engine_config(self, *args, **kwargs):
        config = prepare_engine_args(self)
        vllm_config = original(self, *args, **kwargs)
        if config is not None:
            check_model(vllm_config, config)
            logger.info("MiKV policy %s active: %s", config.policy, config.to_dict())
        return vllm_config

    EngineArgs.create_engine_config = create_engine_config
