"""Non-finite q / k / v in the oracle (core.quant, core.reference): defined codes, a confined token.

Semantics (docs/design.md "Non-finite q / k / v"): every op set sees its inputs through
``quant.finite_inputs`` (NaN -> 0, +-inf -> +-65504, finite values unchanged), the lo quantizer
through ``finite_for_lo`` and the hi tier through ``to_hi`` (NaN -> 0): codes and (scale, zero) are
always defined and finite, and a poisoned token computes exactly like its sanitized copy.
"""

import math

import pytest
import torch

from mikv_vllm.config import MiKVConfig, preset
from mikv_vllm.core import reference as ref
from mikv_vllm.core.layout import RegionLayout
from mikv_vllm.core.quant import FP16_MAX, dequantize_codes, finite_inputs, quantize_codes, to_hi

from core._helpers import make_regions, structured_qkv

NAN, INF = float("nan"), float("inf")


def _poisoned_rows(d: int, group: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, d, generator=gen) * 3
    x[0, 1] = NAN                          # one NaN in the first group
    x[1, :group] = NAN                     # an all-NaN group (the undefined cast of issue 28)
    x[2, 3], x[2, 5] = INF, -INF           # infinities
    x[3, :group] = INF                     # an all-inf group
    x[4, group - 1] = NAN
    x[4, 0] = -INF                         # mixed
    return x                               # row 5: clean


@pytest.mark.parametrize("bits,group", [(2, 16), (3, 32), (4, 64), (8, 8)])
def test_quantize_non_finite_gives_defined_finite_codes(bits, group):
    d = 64
    x = _poisoned_rows(d, group)
    codes, sz = quantize_codes(x, bits, group)
    assert torch.isfinite(sz.float()).all(), sz
    assert int(codes.max()) <= (1 << bits) - 1
    # the poisoned elements quantize as NaN -> 0, +-inf -> +-65504; the bound holds for those values
    clean = torch.nan_to_num(x, nan=0.0, posinf=FP16_MAX, neginf=-FP16_MAX)
    want_codes, want_sz = quantize_codes(clean, bits, group)
    assert torch.equal(codes, want_codes) and torch.equal(sz, want_sz)
    err = (dequantize_codes(codes, sz, group) - clean).abs().reshape(6, -1, group)
    assert (err <= sz[..., 0].float().unsqueeze(-1) / 2 * (1 + 1e-3) + 1e-6).all()
    # an all-NaN group is a constant-0 group: scale 0, zero 0, codes 0
    assert torch.equal(sz[1, 0].float(), torch.zeros(2)) and not codes[1, :group].any()
    # groups without a non-finite element quantize exactly as before (per group, per token)
    g = x.reshape(6, -1, group)
    fine = torch.isfinite(g).all(-1)                                  # [6, G]
    base_codes, base_sz = quantize_codes(torch.where(torch.isfinite(x), x, 0.0), bits, group)
    assert torch.equal(sz[fine], base_sz[fine])
    assert torch.equal(codes.reshape(6, -1, group)[fine], base_codes.reshape(6, -1, group)[fine])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn])
def test_to_hi_stores_nan_as_zero(dtype):
    x = torch.tensor([NAN, -NAN, INF, -INF, 1.5, -2.0, 0.0, 1e6])
    got = to_hi(x, dtype).float()
    top = torch.finfo(dtype).max
    assert torch.isfinite(got).all()
    assert torch.equal(got, torch.tensor([0.0, 0.0, top, -top, 1.5, -2.0, 0.0, min(1e6, top)]).to(dtype).float())


def test_finite_inputs_keeps_finite_values():
    x = torch.tensor([NAN, INF, -INF, 1e30, -7.25, 0.0])
    assert torch.equal(finite_inputs(x), torch.tensor([0.0, FP16_MAX, -FP16_MAX, 1e30, -7.25, 0.0]))
    assert finite_inputs(x.half()).dtype == torch.float16


# ------------------------------------------------------------------ a poisoned token in a request
CONFIGS = {
    "mikv": preset("mikv"),
    "int3-fp16-hi-r0.3": MiKVConfig(policy="mikv", lo_bits=3, hi_ratio=0.3, hi_dtype="float16"),
    "lossless-r1": MiKVConfig(policy="mikv", lo_bits=4, hi_ratio=1.0, hi_dtype="float32"),
    "h2o": preset("h2o"),
}
N, D, HKV, G = 16, 64, 2, 3
PROMPT, POISON, STEPS = 40, 30, 6        # the poisoned token sits in the second chunk (context 24)


def poison(q, k, v, at: int):
    """Copies of q/k/v with token ``at`` poisoned: NaN, +-inf in q, k and v, one all-NaN K group."""
    q, k, v = q.clone(), k.clone(), v.clone()
    k[at, 0, :] = NAN                       # a whole head vector: every group of it
    k[at, 1, 3], k[at, 1, 9] = INF, -INF
    v[at, 0, 5], v[at, 1, :8] = NAN, INF
    q[at, 0, 2], q[at, 2, :] = NAN, -INF
    return q, k, v


def run(ops, cfg, q, k, v, regions, table):
    """Prefill in chunks [0, 24), [24, 40), then STEPS decode steps; outputs and the final pages."""
    scale = 1 / math.sqrt(D)
    outs = [ops.forward_request(regions, LAYOUTS[id(cfg)], cfg, table, c0, q[c0:c1], k[c0:c1], v[c0:c1], scale)
            for c0, c1 in ((0, 24), (24, PROMPT))]
    for p in range(PROMPT, PROMPT + STEPS):
        outs.append(ops.forward_decode(regions, LAYOUTS[id(cfg)], cfg, table[None], [p], q[p:p + 1], k[p:p + 1],
                                       v[p:p + 1], scale))
    return torch.cat(outs), regions


LAYOUTS = {id(c): RegionLayout.build(c, N, D) for c in CONFIGS.values()}


def poisoned_vs_sanitized(ops, name):
    """(clean, poisoned, sanitized) runs of one request: outputs and pages."""
    cfg = CONFIGS[name]
    lay = LAYOUTS[id(cfg)]
    q, k, v = structured_qkv(PROMPT + STEPS, G * HKV, HKV, D, seed=4)
    table = torch.tensor([5, 2, 7, 0])
    pages = make_regions(lay, 8, HKV, garbage=True, seed=1)
    pq, pk, pv = poison(q, k, v, POISON)
    clean = run(ops, cfg, q, k, v, pages.clone(), table)
    bad = run(ops, cfg, pq, pk, pv, pages.clone(), table)
    fixed = run(ops, cfg, finite_inputs(pq), finite_inputs(pk), finite_inputs(pv), pages.clone(), table)
    return lay, table, clean, bad, fixed


def assert_confined(lay, table, clean, bad, fixed):
    (out_c, pages_c), (out_b, pages_b), (out_f, pages_f) = clean, bad, fixed
    # the poisoned token computes exactly as its sanitized copy: same outputs, same page bytes
    assert torch.isfinite(out_b).all()
    assert torch.equal(out_b, out_f)
    assert torch.equal(pages_b, pages_f)
    # rows before it are untouched (no 0 * NaN in P @ V): bit-identical to the clean run
    assert torch.equal(out_b[:POISON], out_c[:POISON])
    # every other token's lo copy is byte-identical to the clean run's; the poisoned token's is finite
    views_b, views_c = lay.views(pages_b), lay.views(pages_c)
    if lay.has_lo:
        for name in ("k_lo", "v_lo", "k_sz", "v_sz"):
            got, want = getattr(views_b, name)[table.long()], getattr(views_c, name)[table.long()]
            got, want = got.transpose(0, 1).flatten(1, 2), want.transpose(0, 1).flatten(1, 2)   # [H, positions, ...]
            others = torch.ones(got.shape[1], dtype=torch.bool)
            others[POISON] = False
            others[PROMPT + STEPS:] = False
            assert torch.equal(got[:, others], want[:, others]), name
        for name in ("k_sz", "v_sz"):
            sz = getattr(views_b, name)[table[POISON // N].long(), :, POISON % N]
            assert torch.isfinite(sz.float()).all()
    if lay.hi_slots:   # every hi copy and score of the request is finite
        blocks = table[: -(-(PROMPT + STEPS) // N)].long()      # the written blocks (the last one is garbage)
        tagged = views_b.tag[blocks] > 0
        assert torch.isfinite(views_b.k_hi[blocks][tagged].float()).all()
        assert torch.isfinite(views_b.v_hi[blocks][tagged].float()).all()
        assert torch.isfinite(views_b.score[blocks][tagged]).all()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_poisoned_token_is_confined_in_the_reference(name):
    assert_confined(*poisoned_vs_sanitized(ref, name))
