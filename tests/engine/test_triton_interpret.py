"""The Triton kernel path through a real vLLM engine, on CPU under the Triton interpreter.

The only end-to-end check of the GPU code these machines allow: the embedded model runs with
``MIKV_VLLM_OPS=triton`` and ``TRITON_INTERPRET=1`` (store / split / merge / mass kernels,
chunked prefill attention, grouped decode) and with ``MIKV_VLLM_OPS=torch`` (core.reference),
same config, same prompts; greedy token ids must be equal. The interpreter is slow: short
prompts, few tokens, float32, enforce_eager. With prefix caching on, later requests read an
earlier one's prefix blocks (shared rows in the Triton decode step and chunks).
"""

from __future__ import annotations

import os

import pytest

from mikv_vllm.eval.engine import offline_engine

pytestmark = pytest.mark.engine

PROMPTS = ["The capital of France is", "List three uses of copper:\n1."]
MAX_TOKENS = 4
# near-lossless (INT8 lo + 20% hi: every kernel and the hi selection run) and the default preset
CONFIGS = {"int8-r0.2": {"preset": "mikv", "lo_bits": 8, "hi_ratio": 0.2}, "default": None}


# prefix caching: a document of several 16-token blocks, then different questions
DOC = ("Copper is a soft, malleable and ductile metal with very high thermal and electrical conductivity. "
       "A freshly exposed surface of pure copper has a pinkish-orange color. It is used as a conductor of heat "
       "and electricity, as a building material, and as a constituent of various metal alloys.")
SHARED = [[DOC + "\n\nQuestion: what color is copper?\nAnswer:"],
          [DOC + "\n\nQuestion: what is copper used for?\nAnswer:", DOC + "\n\nSummary:"]]


def _run(model_dir, mikv, ops: str, capfd, batches=(PROMPTS,), **engine) -> list[list[int]]:
    """Greedy token ids of ``batches`` (lists of prompts, generated one after the other); with
    ``engine`` overrides, also each output's cached prompt tokens, as ``(ids, cached)``."""
    from vllm import SamplingParams

    env = {"MIKV_VLLM_OPS": ops, "TRITON_INTERPRET": "1" if ops == "triton" else None,
           "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}   # fresh processes read TRITON_INTERPRET at import
    saved = {k: os.environ.get(k) for k in env}
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        capfd.readouterr()
        with offline_engine(model_dir, "mikv", mikv, **{**dict(max_model_len=256, max_num_seqs=2,
                                                                max_num_batched_tokens=256), **engine}) as llm:
            outs = [o for batch in batches
                    for o in llm.generate(batch, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))]
        logs = "".join(capfd.readouterr())
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    want = "ops TritonOps" if ops == "triton" else "ops TorchOps"
    assert want in logs, f"engine did not report {want!r}; log tail:\n{logs[-3000:]}"
    if engine:   # prefix caching on: the callers check the cached prompt tokens
        return [(list(o.outputs[0].token_ids), int(o.num_cached_tokens or 0)) for o in outs]
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_triton_ops_match_torch_ops_in_engine(model_dir, capfd, name):
    torch_ids = _run(model_dir, CONFIGS[name], "torch", capfd)
    triton_ids = _run(model_dir, CONFIGS[name], "triton", capfd)
    print(f"{name}: torch {torch_ids} triton {triton_ids}")
    assert all(len(ids) == MAX_TOKENS for ids in torch_ids)
    assert triton_ids == torch_ids


@pytest.mark.parametrize("name", list(CONFIGS))
def test_triton_ops_match_torch_ops_with_prefix_caching(model_dir, capfd, name):
    """One request, then two that share its document (prefix-cache hits of >= 2 blocks: shared rows in
    the chunks and in the batched decode step): the Triton engine's greedy ids equal the torch one's."""
    engine = dict(enable_prefix_caching=True, block_size=16)
    torch_out = _run(model_dir, CONFIGS[name], "torch", capfd, SHARED, **engine)
    triton_out = _run(model_dir, CONFIGS[name], "triton", capfd, SHARED, **engine)
    print(f"{name}: torch {torch_out} triton {triton_out}")
    # greedy decoding may stop at EOS early; a request with cached prefix blocks must decode several steps
    assert any(len(ids) == MAX_TOKENS and cached for ids, cached in torch_out), torch_out
    assert torch_out[0][1] == 0 and all(cached >= 32 for _, cached in torch_out[1:]), torch_out
    assert [c for _, c in triton_out] == [c for _, c in torch_out]
    assert [ids for ids, _ in triton_out] == [ids for ids, _ in torch_out]
