"""vLLM general plugin entry point (``vllm.general_plugins``: ``mikv``).

vLLM calls :func:`register` in every process (API server, engine core,
workers), possibly several times; it is idempotent.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm.mikv")  # child of vLLM's configured logger
_registered = False


def register() -> None:
    """Register the MiKV attention backend, CLI flags and config checks."""
    global _registered
    if _registered:
        return
    _registered = True
    from .vllm_glue import install

    install()
    logger.debug("mikv-vllm plugin registered")
