"""Batched decode step (``ops.torch_decode.forward_decode``, the torch op set) == the per-request step, request by request."""

import math

import pytest
import torch

from mikv_vllm.config import MiKVConfig, preset
from mikv_vllm.core.layout import RegionLayout
from mikv_vllm.core.reference import forward_request
from mikv_vllm.ops import torch_decode as tdec
from mikv_vllm.ops.torch_decode import forward_decode

from ._helpers import make_regions, structured_qkv

HQ, HKV, D, N = 6, 2, 32, 16
SCALE = 1 / math.sqrt(D)
PROMPTS = [37, 16, 5, 60, 1]          # block boundary (16), one-token prompt, several blocks
STEPS = 7

CONFIGS = {
    "mikv": preset("mikv"),
    "mikv-paper": preset("mikv-paper"),
    "h2o": preset("h2o"),
    "rtn": preset("rtn"),
    "window-scorer": MiKVConfig(policy="mikv", lo_bits=3, hi_ratio=0.3, scorer="window", obs_window=8,
                                recent_window=3),
    "all-hi-fp32": MiKVConfig(policy="mikv", lo_bits=4, hi_ratio=1.0, hi_dtype="float32"),
}


def _setup(cfg, seed=0):
    lay = RegionLayout.build(cfg, N, D)
    num_blocks = 24
    regions = make_regions(lay, num_blocks, HKV, garbage=True, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_blocks, generator=gen)
    rows, used = [], 0
    for p in PROMPTS:
        nb = -(-(p + STEPS) // N)
        own = perm[used:used + nb]
        used += nb
        # padding columns point at other requests' blocks: they must never be read or written
        pad = perm[torch.randint(0, num_blocks, (6 - nb,), generator=gen)]
        rows.append(torch.cat([own, pad]))
    table = torch.stack(rows).int()
    qkv = [structured_qkv(p + STEPS, HQ, HKV, D, seed=seed + i) for i, p in enumerate(PROMPTS)]
    for i, p in enumerate(PROMPTS):     # prefill, one request at a time
        q, k, v = qkv[i]
        forward_request(regions, lay, cfg, table[i], 0, q[:p], k[:p], v[:p], SCALE)
    return lay, regions, table, qkv, perm[used:]


def _step(qkv, pos):
    """q, k, v of one decode step: request i's token at position pos[i]."""
    return tuple(torch.stack([qkv[i][j][c] for i, c in enumerate(pos)]) for j in range(3))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batched_decode_matches_per_request(name):
    cfg = CONFIGS[name]
    lay, regions, table, qkv, unused = _setup(cfg)
    solo, batch = regions.clone(), regions.clone()
    for step in range(STEPS):
        pos = [p + step for p in PROMPTS]
        q, k, v = _step(qkv, pos)
        want = torch.cat([forward_request(solo, lay, cfg, table[i], c, q[i:i + 1], k[i:i + 1], v[i:i + 1], SCALE)
                          for i, c in enumerate(pos)])
        got = forward_decode(batch, lay, cfg, table, pos, q, k, v, SCALE)
        assert got.shape == want.shape and torch.isfinite(got).all()
        assert (got - want).abs().max().item() < 1e-5, step
        sv, bv = lay.views(solo), lay.views(batch)
        assert torch.equal(bv.tag, sv.tag), step                 # same hi sets, same slots
        assert torch.allclose(bv.score.float(), sv.score.float(), rtol=1e-5, atol=1e-6, equal_nan=True)
        same_scores = batch.clone()
        lay.views(same_scores).score.copy_(sv.score)
        assert torch.equal(same_scores, solo), step              # every other byte identical
    assert torch.equal(batch[unused], regions[unused])          # blocks of no request are untouched


def test_batch_of_one_and_empty_batch():
    cfg = CONFIGS["mikv"]
    lay, regions, table, qkv, _ = _setup(cfg, seed=1)
    solo = regions.clone()
    q, k, v = (x[PROMPTS[0]:PROMPTS[0] + 1] for x in qkv[0])
    want = forward_request(solo, lay, cfg, table[0], PROMPTS[0], q, k, v, SCALE)
    got = forward_decode(regions, lay, cfg, table[:1], [PROMPTS[0]], q, k, v, SCALE)
    assert (got - want).abs().max().item() < 1e-5
    assert torch.equal(lay.views(regions).tag, lay.views(solo).tag)
    empty = forward_decode(regions, lay, cfg, table[:0], [], q[:0], k[:0], v[:0], SCALE)
    assert empty.shape == (0, HQ, D)


def test_cpu_decode_benchmark_runs(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "cpu_decode.py"
    spec = importlib.util.spec_from_file_location("cpu_decode", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--context", "130", "--batch", "2", "--steps", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| mikv |")]
    assert len(rows) == 1 and rows[0].endswith("x |")


@pytest.mark.parametrize("name", ["mikv", "h2o"])
def test_batch_invariance(name):
    """A request's decode step gives bit-identical outputs and pages alone or in any batch."""
    cfg = CONFIGS[name]
    lay, regions, table, qkv, _ = _setup(cfg, seed=2)
    alone, together = regions.clone(), regions.clone()
    for step in range(STEPS):
        pos = [p + step for p in PROMPTS]
        q, k, v = _step(qkv, pos)
        solo = torch.cat([forward_decode(alone, lay, cfg, table[i:i + 1], [c], q[i:i + 1], k[i:i + 1], v[i:i + 1],
                                         SCALE) for i, c in enumerate(pos)])
        batch = forward_decode(together, lay, cfg, table, pos, q, k, v, SCALE)
        assert torch.equal(solo, batch), step
        assert torch.equal(alone, together), step


def test_large_batches_split_into_bounded_groups(monkeypatch):
    assert tdec.decode_groups([5, 100, 7, 60], limit=130) == [[0, 2], [3], [1]]
    assert tdec.decode_groups([500], limit=10) == [[0]]
    cfg = CONFIGS["mikv"]
    lay, regions, table, qkv, _ = _setup(cfg, seed=3)
    one, split = regions.clone(), regions.clone()
    pos = list(PROMPTS)
    q, k, v = _step(qkv, pos)
    whole = forward_decode(one, lay, cfg, table, pos, q, k, v, SCALE)
    monkeypatch.setattr(tdec, "DECODE_TOKENS_PER_CALL", 70)
    assert len(tdec.decode_groups(pos)) > 2
    parts = forward_decode(split, lay, cfg, table, pos, q, k, v, SCALE)
    assert torch.equal(whole, parts) and torch.equal(one, split)
