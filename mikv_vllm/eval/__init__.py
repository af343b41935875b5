"""Quality benchmark of the MiKV KV cache (``mikv-vllm eval`` / ``tune``; docs/quality.md).

Importing this package is cheap (no torch, no vllm): the heavy parts load when run.
"""
