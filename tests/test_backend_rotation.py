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
    cache = torch.zeros(4, HKV, N, lay.content_bytes // 4)                  # fp32 model dtype
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


def test_rotation_needs_a_power_of_two_head_dim():
    from vllm.config import VllmConfig, set_current_vllm_config

    from mikv_vllm.config import MiKVConfigError

    with set_current_vllm_config(VllmConfig(additional_config={"kv_cache_policy": "rtn", "mikv": {"rotation": True}})):
        with pytest.raises(MiKVConfigError, match="power-of-two"):
            MiKVAttentionImpl(6, 96, 0.1, 2)
