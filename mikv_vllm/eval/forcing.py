"""Teacher forcing for vLLM decode steps: a V1 logits processor that makes a request emit given tokens.

A request whose ``SamplingParams.extra_args`` holds ``{"forced_tokens": [t0, t1, ...]}`` samples
``t_i`` at its i-th output step (every other logit is set to -inf); other requests are untouched.
With vLLM's default ``logprobs_mode="raw_logprobs"`` and ``logprobs=0``, each output step then
reports the model's own log-probability of the forced token (computed before logits processors),
which is what a teacher-forced perplexity needs: every scored position runs as a real decode step
over the (compressed) cache. Used by the quality harness's decode perplexity probe
(``workload.Workload.decode_windows``); load it with ``LLM(logits_processors=[ForcedTokens])``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

KEY = "forced_tokens"


class ForcedTokens(LogitsProcessor):
    """Per request: force output token i to ``extra_args["forced_tokens"][i]``."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.rows: dict[int, tuple[Sequence[int], list[int]]] = {}   # batch row -> (forced, output ids)

    @classmethod
    def validate_params(cls, params: SamplingParams) -> None:
        forced = (params.extra_args or {}).get(KEY)
        if forced is not None and (not isinstance(forced, (list, tuple))
                                   or not all(isinstance(t, int) and t >= 0 for t in forced)):
            raise ValueError(f"extra_args[{KEY!r}] must be a list of token ids")

    def is_argmax_invariant(self) -> bool:
        return False    # it changes which token greedy sampling picks

    @staticmethod
    def _state(params: SamplingParams, _prompt: list[int] | None, output: list[int]):
        forced = (params.extra_args or {}).get(KEY)
        return (forced, output) if forced else None

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, self._state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for row, (forced, output) in self.rows.items():
            step = len(output)
            if step < len(forced):
                keep = logits[row, forced[step]].clone()
                logits[row].fill_(-float("inf"))
                logits[row, forced[step]] = keep if torch.isfinite(keep) else 0.0
        return logits
