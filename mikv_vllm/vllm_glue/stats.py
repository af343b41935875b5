"""Per-layer MiKV counters kept by each attention impl (worker side)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LayerStats:
    """Counters of one attention layer since engine start."""

    steps: int = 0
    tokens_stored: int = 0          # new tokens written to the cache
    prefill_tokens: int = 0         # of those, in multi-token chunks
    decode_tokens: int = 0          # of those, single-token steps
    demoted: int = 0                # (token, KV head) pairs that left the hi tier
    promoted: int = 0               # (token, KV head) pairs that entered the hi tier
    hi_tokens: int = 0              # hi (token, KV head) pairs of the last step's requests
    seen_tokens: int = 0            # (token, KV head) pairs of the last step's requests
    extra: dict = field(default_factory=dict)

    def record(self, ctx_len: int, num_new: int) -> None:
        self.tokens_stored += num_new
        if num_new > 1:
            self.prefill_tokens += num_new
        else:
            self.decode_tokens += num_new
