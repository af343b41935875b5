"""Framework-free MiKV core (pure torch, never imports vllm).

layout      RegionLayout: bytes of one (block, KV head) region, typed views
quant       per-token asymmetric RTN, bit packing
balancer    key channel balancer
importance  hi-set selection (sinks, recent, heavy hitters)
page        per-request page steps: balancer, store, lo copies, scores, hi maintenance
reference   the oracle (tests only): dense gather + attention, forward_request and its loops
rotation    randomised Hadamard rotation of q/k/v (MiKVConfig.rotation)
accounting  bytes/token tables
"""

from .accounting import bytes_row, bytes_table, paper_fraction_with_lo_copy, to_markdown
from .balancer import (balance_keys, compute_balancer, from_storage as balancer_from_storage,
                       to_storage as balancer_to_storage, unbalance_keys)
from .importance import hi_budget, priority_tiers, select_hi
from .layout import (RegionLayout, RegionViews, as_regions, dense_bytes_per_token, hi_slots_per_block,
                     paper_cache_fraction)
from .quant import (dequantize, dequantize_codes, fake_quantize, pack_codes, quantize, quantize_codes,
                    unpack_codes)
from .rotation import Rotation, hadamard, rotation_for, rotation_matrix
from .page import (accumulate_scores, first_voting_row, load_balancer, maintain_hi, store_balancer, token_slots,
                   write_tokens)
from .reference import attention, forward_request, gather_context

__all__ = [
    "RegionLayout", "RegionViews", "as_regions", "dense_bytes_per_token", "hi_slots_per_block",
    "paper_cache_fraction",
    "pack_codes", "unpack_codes", "quantize", "quantize_codes", "dequantize", "dequantize_codes", "fake_quantize",
    "compute_balancer", "balance_keys", "unbalance_keys", "balancer_to_storage", "balancer_from_storage",
    "hi_budget", "priority_tiers", "select_hi",
    "token_slots", "write_tokens", "gather_context", "attention", "first_voting_row", "accumulate_scores",
    "maintain_hi", "store_balancer", "load_balancer", "forward_request",
    "Rotation", "hadamard", "rotation_for", "rotation_matrix",
    "bytes_row", "bytes_table", "paper_fraction_with_lo_copy", "to_markdown",
]
