"""MiKVAttentionImpl.forward with MiKVConfig.rotation: q/k/v rotated before the page, output back."""

import math
from types import SimpleNamespace

import pytest
import torch

from core._helpers import dense_attention, structured_qkv
from mikv_vllm.core.layout import RegionLayout
from mikv_vllm.vllm_glue.backend import MiKVAttentionImpl, MiKVMetadataBuilder

HQ, HKV, D, N = 6, 2, 64, 16


def _impl(policy, mikv):
    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig(additional_config={"kv_cache_policy": policy, "mikv": mikv})):
        impl = MiKVAttentionImpl(HQ, D, 1 / math.sqrt(D), HKV)
    impl.stats.sampled = False
    return impl


def _meta(config, qlen, ctx, cols=4):
    builder = MiKVMetadataBuilder.__new__(MiKVMetadataBuilder)
    builder.init_plans(config, N, D, HQ, HKV, max_rows=1, max_cols=cols, device="cpu")
    qsl = torch.tensor([0, qlen], dtype=torch.int32)
    m = SimpleNamespace(num_reqs=1, query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=torch.tensor([ctx + qlen]).int(),
                        block_table_tensor=torch.tensor([[3, 0, 2, 1][:cols]], dtype=torch.int32),
                        slot_mapping=torch.zeros(qlen, dtype=torch.int64), num_actual_tokens=qlen)
    return builder.build(0, m)


def _run(impl, q, k, v, prefill=40):
    """A prefill chunk then one-token steps through forward(); outputs [T, Hq, D]."""
    lay = RegionLayout.build(impl.config, N, D)
    cache = torch.zeros(4, HKV, N, lay.content_bytes, dtype=torch.uint8)    # as the engine allocates it
    outs, start = [], 0
    for size in [prefill] + [1] * (q.shape[0] - prefill):
        sl = slice(start, start + size)
        out = torch.empty(size, HQ * D)
        impl.forward(None, q[sl].reshape(size, -1), k[sl].reshape(size, -1), v[sl].reshape(size, -1), cache,
                     _meta(impl.config, size, start), out)
        outs.append(out.view(size, HQ, D))
        start += size
    return torch.cat(outs)


def test_rotation_is_transparent_when_the_page_is_lossless():
    q, k, v = structured_qkv(44, HQ, HKV, D, seed=4)
    want = dense_attention(q, k, v, 1 / math.sqrt(D))
    impl = _impl("mikv", {"lo_bits": 4, "hi_ratio": 1.0, "hi_dtype": "float32", "rotation": True})
    assert impl.rotation is not None
    torch.testing.assert_close(_run(impl, q, k, v), want, rtol=1e-4, atol=1e-4)


def test_rotation_cuts_the_output_error_of_low_bit_keys():
    q, k, v = structured_qkv(44, HQ, HKV, D, seed=5)                          # outlier key channels
    want = dense_attention(q, k, v, 1 / math.sqrt(D))
    err = {}
    for rot in (False, True):
        impl = _impl("rtn", {"lo_bits": 3, "group_size": 64, "rotation": rot})
        err[rot] = float((_run(impl, q, k, v) - want).pow(2).mean())
    assert err[True] < 0.7 * err[False], err


def test_rotation_falls_back_on_a_head_dim_it_cannot_take(caplog, monkeypatch):
    """A rotated preset on head_dim 96 (not a power of two) serves the unrotated variant, with one log
    line per process (not one per layer), not an error."""
    import logging

    from vllm.config import VllmConfig, set_current_vllm_config

    from mikv_vllm.vllm_glue import backend

    caplog.set_level(logging.WARNING, logger="vllm.mikv")
    monkeypatch.setattr(logging.getLogger("vllm.mikv"), "propagate", True)   # vLLM's logger config may stop it
    monkeypatch.setattr(backend.MiKVAttentionImpl, "_fallback_logged", False)
    extra = {"kv_cache_policy": "mikv", "mikv": {"preset": "mikv", "rotation": True}}
    with set_current_vllm_config(VllmConfig(additional_config=extra)):
        impls = [MiKVAttentionImpl(6, 96, 0.1, 2) for _ in range(3)]
        rotated = MiKVAttentionImpl(6, 64, 0.1, 2)
    assert all(i.rotation is None and i.config.rotation is False for i in impls)
    assert rotated.rotation is not None and rotated.config.rotation is True
    lines = [r.getMessage() for r in caplog.records if "unrotated" in r.getMessage()]
    assert len(lines) == 1 and "head_dim is 96" in lines[0], lines
