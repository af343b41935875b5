"""mikv-vllm: a mixed-precision (MiKV) KV cache for vLLM.

Every token's K/V is kept at low precision; the tokens that matter most are
also kept at high precision, so no token is ever dropped.

Importing this package is deliberately cheap: it imports neither torch nor
vllm. The vLLM integration is loaded by vLLM itself through the
``vllm.general_plugins`` entry point (``mikv_vllm.plugin:register``).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
