"""Start and stop an offline vLLM engine for one KV cache policy (tests, eval)."""

from __future__ import annotations

import contextlib
import gc
from typing import Any, Iterator


def engine_kwargs(policy: str | None, mikv: dict | str | None = None, **overrides: Any) -> dict[str, Any]:
    """``LLM(...)`` keyword arguments; ``policy`` None = stock vLLM."""
    kwargs: dict[str, Any] = dict(dtype="float32", enforce_eager=True, max_model_len=4096,
                                  kv_cache_memory_bytes=1 << 30, seed=0)
    if policy is not None:
        extra: dict[str, Any] = {"kv_cache_policy": policy}
        if mikv is not None:
            extra["mikv"] = mikv
        kwargs["additional_config"] = extra
    kwargs.update(overrides)
    return kwargs


@contextlib.contextmanager
def offline_engine(model_dir, policy: str | None = None, mikv: dict | str | None = None,
                   **overrides: Any) -> Iterator[Any]:
    """A ``vllm.LLM`` for ``policy``, shut down (engine-core process included) on exit."""
    from vllm import LLM

    llm = LLM(model=str(model_dir), **engine_kwargs(policy, mikv, **overrides))
    try:
        yield llm
    finally:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def capacity_tokens(llm) -> int:
    """KV cache capacity in tokens as computed by the engine core."""
    cfg = llm.llm_engine.vllm_config.cache_config
    return int(cfg.num_gpu_blocks) * int(cfg.block_size)


def prose_nll(llm, length: int = 1024, skip: int = 16) -> float:
    """Mean NLL of one fixed ``length``-token prose window (the eval corpus), positions >= ``skip``.

    Prefill chunking is the engine's: build it with ``max_num_batched_tokens=skip`` and chunked
    prefill on so that every token after the first chunk attends to the compressed cache.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from .data import TokenStream

    ids = TokenStream(llm.get_tokenizer()).windows("ppl", length, 1)[0]
    out = llm.generate([TokensPrompt(prompt_token_ids=ids)],
                       SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0), use_tqdm=False)[0]
    nll = [-lp[tok].logprob for tok, lp in zip(ids[skip:], out.prompt_logprobs[skip:])]
    return sum(nll) / len(nll)
