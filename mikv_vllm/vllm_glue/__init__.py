"""Everything that imports vLLM. The algorithm lives in :mod:`mikv_vllm.core`."""

from __future__ import annotations

BACKEND_PATH = "mikv_vllm.vllm_glue.backend.MiKVAttentionBackend"
WORKER_EXTENSION = "mikv_vllm.vllm_glue.worker_ext.MiKVWorkerExtension"


def install() -> None:
    """Register the backend under vLLM's CUSTOM slot and install the patches."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)

    from . import cli_args, engine_config, platform_patch

    platform_patch.install()
    cli_args.install()
    engine_config.install()
