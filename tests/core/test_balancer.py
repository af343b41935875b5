"""Key channel balancer: formula, GQA grouping, safety, storage round trip, real-model benefit."""

import importlib.metadata

import pytest
import torch

from mikv_vllm.config import MiKVConfig
from mikv_vllm.core.balancer import (B_MAX, B_MIN, balance_keys, compute_balancer, from_storage, to_storage,
                                     unbalance_keys)
from mikv_vllm.core.layout import RegionLayout
from mikv_vllm.core.quant import fake_quantize
from mikv_vllm.core.reference import forward_request, gather_context, load_balancer

from ._helpers import make_regions, structured_qkv


def test_formula_and_gqa_grouping():
    t, hq, hkv, d = 5, 6, 2, 4
    q = torch.zeros(t, hq, d)
    k = torch.ones(t, hkv, d)
    q[2, 1, 0] = -16.0        # query head 1 -> KV head 0
    q[4, 4, 3] = 9.0          # query head 4 -> KV head 1 (heads 3, 4, 5)
    k[0, 1, 3] = -4.0
    b = compute_balancer(q, k)
    assert b.shape == (hkv, d) and b.dtype == torch.float32
    assert b[0, 0] == 4.0                       # sqrt(16 / 1)
    assert b[1, 3] == 1.5                       # sqrt(9 / 4)
    assert (b[0, 1:] == 1).all() and (b[1, :3] == 1).all()   # max|q| = 0 -> 1


def test_undefined_channels_give_one():
    q = torch.tensor([[[0.0, 2.0, float("inf"), 1.0, float("nan")]]])
    k = torch.tensor([[[1.0, 0.0, 1.0, float("nan"), 1.0]]])
    assert compute_balancer(q, k).tolist() == [[1.0, 1.0, 1.0, 1.0, 1.0]]


def test_storage_clamps_to_normal_fp16():
    b = torch.tensor([1e-12, 0.3, 1e12])
    s = to_storage(b)
    assert s.dtype == torch.float16
    assert from_storage(s).tolist() == [B_MIN, float(torch.tensor(0.3).half()), B_MAX]
    assert torch.isfinite(1 / from_storage(s)).all()


def test_balancer_round_trip():
    q, k, _ = structured_qkv(64, 6, 2, 32, seed=1)
    b = from_storage(to_storage(compute_balancer(q, k)))
    assert torch.allclose(unbalance_keys(balance_keys(k, b), b), k, rtol=1e-6, atol=0)
    # logits are preserved up to fp32 rounding: (q / b) . (k * b) == q . k
    assert torch.allclose(torch.einsum("thd,shd->ts", q[:, :3] / b[0], balance_keys(k, b)[:, :1].expand(-1, 3, -1)),
                          torch.einsum("thd,shd->ts", q[:, :3], k[:, :1].expand(-1, 3, -1)), rtol=1e-4, atol=1e-4)
    # balanced max|q/b| == balanced max|k*b| == sqrt(max|q| max|k|) per channel (before fp16 storage)
    b32 = compute_balancer(q, k)
    qm = (q.abs().reshape(64, 2, 3, 32).amax(dim=(0, 2)) / b32)
    km = (k.abs() * b32).amax(0)
    assert torch.allclose(qm, km, rtol=1e-5)


def test_balancer_round_trip_through_the_page():
    cfg = MiKVConfig(policy="mikv", lo_bits=8, hi_ratio=0.1, balancer=True)
    lay = RegionLayout.build(cfg, 16, 32)
    q, k, v = structured_qkv(40, 6, 2, 32, seed=2)
    regions = make_regions(lay, 4, 2, garbage=True)
    row = torch.tensor([3, 1, 2])
    forward_request(regions, lay, cfg, row, 0, q[:30], k[:30], v[:30], 0.2)
    stored = load_balancer(regions, lay, row)
    # from the chunk's tokens in the first block only (block size 16), not the whole 30-token chunk
    assert torch.equal(stored, from_storage(to_storage(compute_balancer(q[:16], k[:16]))))
    assert not torch.equal(stored, from_storage(to_storage(compute_balancer(q[:30], k[:30]))))
    forward_request(regions, lay, cfg, row, 30, q[30:], k[30:], v[30:], 0.2)
    assert torch.equal(load_balancer(regions, lay, row), stored)        # frozen after the first chunk
    kc, _, _ = gather_context(regions, lay, row, 40, stored)
    # 8-bit lo copy of k*b, divided back by b: within half a quantization step of k*b, divided by b
    kb = (k * stored).transpose(0, 1)
    step = (kb.reshape(2, 40, 2, 16).amax(-1) - kb.reshape(2, 40, 2, 16).amin(-1)) / 255
    bound = (step.repeat_interleave(16, -1) * 0.51 + 1e-6) / stored[:, None, :]
    assert ((kc - k.transpose(0, 1)).abs() <= bound).all()


# ----------------------------------------------------------- real model
PROSE_TOKENS = 256
def _prose_text() -> str:
    """English prose shipped with the environment: transformers' LICENSE (Apache-2.0 text)."""
    dist = importlib.metadata.distribution("transformers")
    lic = next(f for f in dist.files if f.name.upper().startswith("LICENSE"))
    return " ".join(open(dist.locate_file(lic), encoding="utf-8").read().split())


@pytest.fixture(scope="module")
def smollm_qk(model_dir):
    """Post-RoPE (q [T, Hq, D], k [T, Hkv, D]) of every layer of the embedded SmolLM2 on PROSE_TOKENS prose tokens.

    ``model_dir`` (tests/conftest.py) is ``mikv_vllm.model.prepare_model()``; q/k are captured
    at the attention call (after RoPE, before GQA repetition), then eager attention runs.
    """
    import transformers
    from transformers import AttentionInterface
    from transformers.models.llama.modeling_llama import eager_attention_forward

    path = model_dir
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    captured = []

    def capture(module, query, key, value, attention_mask, **kw):
        captured.append((query[0].transpose(0, 1).clone(), key[0].transpose(0, 1).clone()))
        return eager_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("mikv_test_capture", capture)
    model.set_attn_implementation("mikv_test_capture")
    ids = tok(_prose_text(), return_tensors="pt").input_ids[:, :PROSE_TOKENS]
    assert ids.shape[1] == PROSE_TOKENS
    with torch.no_grad():
        model(ids)
    assert len(captured) == model.config.num_hidden_layers
    return captured


def test_balancer_reduces_int2_key_error_on_smollm2(smollm_qk):
    logit_err = {True: 0.0, False: 0.0}
    key_err = {True: 0.0, False: 0.0}
    wins = 0
    for q, k in smollm_qk:
        d = k.shape[-1]
        g = q.shape[1] // k.shape[1]
        b = from_storage(to_storage(compute_balancer(q, k)))
        k_hat = {False: fake_quantize(k, 2, d // 2), True: unbalance_keys(fake_quantize(k * b, 2, d // 2), b)}
        exact = torch.einsum("thd,shd->hts", q, k.repeat_interleave(g, 1))
        errs = {}
        for use, kh in k_hat.items():
            approx = torch.einsum("thd,shd->hts", q, kh.repeat_interleave(g, 1))
            errs[use] = ((approx - exact).norm() / exact.norm()).item()
            logit_err[use] += errs[use]
            key_err[use] += ((kh - k).norm() / k.norm()).item()
        wins += errs[True] < errs[False]
    n = len(smollm_qk)
    print(f"per layer: logit err {logit_err[True] / n:.3f} (balanced) vs {logit_err[False] / n:.3f}, "
          f"key err {key_err[True] / n:.3f} vs {key_err[False] / n:.3f}, balanced wins {wins}/{n} layers")
    assert logit_err[True] < 0.8 * logit_err[False], (logit_err, n)     # measured ~0.22 vs ~0.35 per layer
    assert key_err[True] < key_err[False], key_err
    assert wins >= 0.8 * n, wins
