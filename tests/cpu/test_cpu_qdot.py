"""The C++ decode op's int8 QK path (``MIKV_CPU_QK=int8``; the default is the exact ``fp32``) against
a torch model of it.

The model is the reference decode step with the logits of lo tokens taken as the int8 path defines
them (mikv_qdot.h): q (pre-divided by the balancer) quantized per head to int8 with amax / 127 and
round-half-even, ``logit = sum_k s_k * qa * (c_k . qi_k) + z_k * sum(ql_k)`` per quantization group
k; hi copies and the new token in fp32. Outputs must agree to fp32 rounding and the pages byte for
byte (scores to rounding), over several decode steps with the hi-set upkeep.
"""

import math

import pytest
import torch

from mikv_vllm.core import reference as ref
from mikv_vllm.ops import torch_decode as tdec
from mikv_vllm.core.quant import unpack_codes, unpack_meta
from mikv_vllm.cpu import decode_step

from core._helpers import assert_pages
from cpu.test_cpu_ops import CONFIGS, PROMPTS, STEPS, _setup, _step


def _per_head(x):
    b, nb, h, n = x.shape[:4]
    return x.transpose(1, 2).reshape(b, h, nb * n, *x.shape[4:])


def int8_lo_logits(regions, lay, table, pos, q, scale, bal):
    """``[B, H, G, Lmax]``: every context token's logit from its lo copy, as the int8 path takes it."""
    views = lay.views(regions)
    n, d, grp = lay.block_size, lay.head_dim, lay.group
    bsz, hq, _ = q.shape
    h = regions.shape[1]
    lmax = int(pos.max())
    blocks = table[:, : -(-lmax // n)].long()
    codes = _per_head(unpack_codes(views.k_lo[blocks], lay.k_bits, d))[:, :, :lmax].double()  # [B, H, L, D]
    k_sz = unpack_meta(views.k_sz[blocks]) if lay.scale_fp8 else views.k_sz[blocks]
    sz = _per_head(k_sz.float())[:, :, :lmax].double()                                        # [B, H, L, NG, 2]
    ql = (q.float() * scale).reshape(bsz, h, hq // h, d)
    if bal is not None:
        ql = ql / bal[:, :, None, :]
    amax = ql.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    qi = (ql * inv).round().clamp(-127, 127).double()
    qa = (amax / 127.0).double()
    ng = d // grp
    idot = torch.einsum("bhlkc,bhgkc->bhglk", codes.reshape(bsz, h, lmax, ng, grp), qi.reshape(bsz, h, -1, ng, grp))
    qsum = ql.double().reshape(bsz, h, -1, ng, grp).sum(-1)                                   # [B, H, G, NG]
    s, z = sz[..., 0][:, :, None], sz[..., 1][:, :, None]                                      # [B, H, 1, L, NG]
    return (s * qa[..., None] * idot + z * qsum[:, :, :, None, :]).sum(-1)


def hi_mask(regions, lay, table, pos):
    """``[B, H, Lmax]``: context positions read from a hi copy (every column owned)."""
    bsz, h, lmax, n, r = pos.shape[0], regions.shape[1], int(pos.max()), lay.block_size, lay.hi_slots
    mask = torch.zeros(bsz, h, lmax, dtype=torch.bool)
    if not r:
        return mask
    tags = lay.views(regions).tag
    for b in range(bsz):
        for j in range(-(-int(pos[b]) // n)):
            t = tags[table[b, j].long()].long()                                  # [H, R]
            hh, rr = torch.nonzero((t > 0) & (t <= pos[b]), as_tuple=True)
            mask[b, hh, t[hh, rr] - 1] = True
    return mask


def model_step(regions, lay, cfg, table, pos, q, k, v, scale, upkeep):
    """The int8 path's decode step on ``regions`` (store, attention, scores, upkeep); returns out."""
    bal = tdec.decode_balancer(regions, lay, table, pos, q, k)
    blk = table.long().gather(1, (pos // lay.block_size)[:, None])[:, 0]
    ref.store_at(regions, lay, blk, pos % lay.block_size, k, v, bal)
    k_ctx, v_ctx, valid = tdec.gather_decode(regions, lay, table, pos, bal)
    bsz, hq, d = q.shape
    h = regions.shape[1]
    qs = (q.float() * scale).reshape(bsz, h, hq // h, d).double()
    logits = torch.einsum("bhgd,bhld->bhgl", qs, k_ctx.double())
    if lay.has_lo and int(pos.max()):
        lo = ~hi_mask(regions, lay, table, pos)
        logits = torch.where(lo[:, :, None], int8_lo_logits(regions, lay, table, pos, q, scale, bal), logits)
    out = torch.empty(bsz, h, hq // h, d, dtype=torch.float64)
    mass = torch.zeros(bsz, h, k_ctx.shape[2] + 1)
    for b, length in enumerate(pos.tolist()):
        lg = torch.cat([logits[b, :, :, :length], torch.einsum("hgd,hd->hg", qs[b], k[b].double())[..., None]], -1)
        ok = torch.cat([valid[b, :, :length], torch.ones(h, 1, dtype=torch.bool)], -1)
        p = torch.softmax(lg.masked_fill(~ok[:, None], -math.inf), dim=-1)
        out[b] = torch.einsum("hgl,hld->hgd", p, torch.cat([v_ctx[b, :, :length], v[b][:, None]], 1).double())
        mass[b, :, : length + 1] = p.sum(1).float()
    tdec.accumulate_scores_decode(regions, lay, table, pos, mass)
    if upkeep:
        tdec.maintain_hi_decode(regions, lay, cfg, table, pos, k, v, mass)
    return out.reshape(bsz, hq, d).float()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_int8_decode_steps_match_the_model(name, monkeypatch):
    monkeypatch.setenv("MIKV_CPU_QK", "int8")
    cfg, group, d = CONFIGS[name]
    lay, regions, table, qkv, unused = _setup(cfg, group, d, seed=3)
    scale = 1 / math.sqrt(d)
    mine, oracle = regions.clone(), regions.clone()
    for step in range(STEPS):
        pos = torch.tensor([p + step for p in PROMPTS])
        q, k, v = _step(qkv, pos.tolist())
        want = model_step(oracle, lay, cfg, table, pos, q, k, v, scale, upkeep=True)
        got = decode_step(mine, lay, table, pos, q, k, v, scale, cfg)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"step {step}: {m}")
        assert_pages(lay, mine, oracle, f"step {step}")
    assert torch.equal(mine[unused], regions[unused])


def test_int8_and_fp32_modes_differ(monkeypatch):
    """The switch is real: int8 and fp32 give different outputs (by up to ~0.2 on this structured
    data, so int8 is not the default before a quality check); an unset variable means fp32."""
    cfg, group, d = CONFIGS["mikv"]
    lay, regions, table, qkv, _ = _setup(cfg, group, d, seed=4)
    pos = torch.tensor(PROMPTS)
    q, k, v = _step(qkv, PROMPTS)
    outs = {}
    for mode in ("int8", "fp32"):
        monkeypatch.setenv("MIKV_CPU_QK", mode)
        outs[mode] = decode_step(regions.clone(), lay, table, pos, q, k, v, 1 / math.sqrt(d))
    monkeypatch.delenv("MIKV_CPU_QK")
    default = decode_step(regions.clone(), lay, table, pos, q, k, v, 1 / math.sqrt(d))
    assert torch.equal(default, outs["fp32"])
    diff = (outs["int8"] - outs["fp32"]).abs().max().item()
    assert 0 < diff < 1.0, diff


def test_bad_mode_raises(monkeypatch):
    cfg, group, d = CONFIGS["mikv"]
    lay, regions, table, qkv, _ = _setup(cfg, group, d)
    monkeypatch.setenv("MIKV_CPU_QK", "int4")
    with pytest.raises(RuntimeError, match="MIKV_CPU_QK"):
        decode_step(regions, lay, table, torch.tensor(PROMPTS), *_step(qkv, PROMPTS), 1 / math.sqrt(d))
