"""The op contract: every op set (batched torch, fused C++, Triton under the interpreter) runs the
same steps on the same garbage-filled pages as the oracle (``core.reference.forward_request`` per
request) and gives the same outputs and page bytes (scores to fp32 summation order).

Steps: prefill chunks (two requests at context 0, one chunked over a block boundary), a mixed step
(a chunk continuing at context 20, a decode row, a first token at context 0), then decode steps of
all rows; and a shared-prefix case (a reader whose first blocks are a writer's, ``own_from``).
Lives in tests/kernels so that Triton is imported under ``TRITON_INTERPRET=1`` (conftest.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from core._helpers import assert_pages, make_regions, structured_qkv
from mikv_vllm.config import preset
from mikv_vllm.core import reference as ref
from mikv_vllm.core.layout import RegionLayout
from mikv_vllm.ops import MiKVOps

N, HKV, GROUP, D = 16, 2, 3, 64
SCALE = 1 / math.sqrt(D)
PRESETS = ["mikv", "mikv-paper", "rtn-int4", "h2o"]
# keys and values at their own widths (issue 26): name -> config
SPLIT = {"mikv-k4v3": lambda: preset("mikv-int4-r03").replace(v_bits=3, name="mikv-k4v3"),
         "rtn-k4v2": lambda: preset("rtn-int4").replace(v_bits=2, name="rtn-k4v2"),
         "mikv-paper-k2v4": lambda: preset("mikv-paper").replace(k_bits=2, v_bits=4, name="mikv-paper-k2v4"),
         # leaner group metadata (fp8 e5m2 scale, fp16 zero)
         "mikv-int4-r03": lambda: preset("mikv-int4-r03")}     # INT4 values, fp16 group metadata
# never demotes (r = 1): a reader uses every hi copy of the shared prefix (core.page.shared_hi_limit)
LOSSLESS = {"mikv-r1": lambda: preset("mikv").replace(hi_ratio=1.0, name="mikv-r1")}
DECODE_STEPS = 4


def op_set(name: str):
    if name == "torch":
        from mikv_vllm.ops.torch_ops import TorchOps

        return TorchOps
    if name == "cpu":
        from mikv_vllm.cpu import CpuOps, load

        load()
        return CpuOps
    from mikv_vllm.kernels import TritonOps

    return TritonOps


OP_SETS = ["torch", "cpu", "triton"]


def _pages(cfg, seed):
    lay = RegionLayout.build(cfg, N, D)
    regions = make_regions(lay, 24, HKV, garbage=True, seed=seed)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(seed))
    table = perm[:18].reshape(3, 6).int()            # three requests, six blocks each, shuffled
    return lay, regions, table


def _check(lay, got_out, want_out, got_pages, want_pages, what):
    assert torch.isfinite(got_out).all(), what
    torch.testing.assert_close(got_out, want_out, rtol=1e-4, atol=1e-4, msg=lambda m: f"{what}: {m}")
    assert_pages(lay, got_pages, want_pages, what)


def _config(name: str):
    if name in SPLIT or name in LOSSLESS:
        return {**SPLIT, **LOSSLESS}[name]()
    return preset(name)


@pytest.mark.parametrize("preset_name", PRESETS + list(SPLIT))
@pytest.mark.parametrize("ops_name", OP_SETS)
def test_op_set_matches_the_oracle(ops_name, preset_name):
    ops = op_set(ops_name)
    assert isinstance(ops, MiKVOps)
    cfg = _config(preset_name)
    lay, regions, table = _pages(cfg, seed=1)
    mine, oracle = regions.clone(), regions.clone()
    qkv = [structured_qkv(60, GROUP * HKV, HKV, D, seed=10 + i) for i in range(3)]

    def rows_of(parts):   # [(request, start, end)] -> q, k, v of those rows, concatenated
        return (torch.cat([qkv[i][j][s:e] for i, s, e in parts]) for j in range(3))

    # step 1: chunks of requests 0 (37 tokens) and 1 (20 tokens), both at context 0
    q, k, v = rows_of([(0, 0, 37), (1, 0, 20)])
    rows = torch.tensor([[0, 37], [37, 57]])
    got = ops.forward_chunks(mine, lay, cfg, table[:2], [0, 0], rows, q, k, v, SCALE)
    want = ref.forward_chunks(oracle, lay, cfg, table[:2], [0, 0], rows, q, k, v, SCALE)
    _check(lay, got, want, mine, oracle, f"{ops_name} prefill")
    # step 2: request 1 continues (9 tokens at context 20), request 0 decodes, request 2 is a first token
    q, k, v = rows_of([(1, 20, 29)])
    got = ops.forward_chunks(mine, lay, cfg, table[1:2], [20], torch.tensor([[0, 9]]), q, k, v, SCALE)
    want = ref.forward_chunks(oracle, lay, cfg, table[1:2], [20], torch.tensor([[0, 9]]), q, k, v, SCALE)
    _check(lay, got, want, mine, oracle, f"{ops_name} chunk at context 20")
    pos = [37, 29, 0]
    for step in range(DECODE_STEPS):      # every row decodes (request 2 from context 0)
        q, k, v = rows_of([(i, p, p + 1) for i, p in enumerate(pos)])
        got = ops.forward_decode(mine, lay, cfg, table, pos, q, k, v, SCALE)
        want = ref.forward_decode(oracle, lay, cfg, table, pos, q, k, v, SCALE)
        _check(lay, got, want, mine, oracle, f"{ops_name} decode step {step}")
        pos = [p + 1 for p in pos]


@pytest.mark.parametrize("preset_name", ["mikv", "h2o", "mikv-k4v3", "mikv-r1"])
@pytest.mark.parametrize("ops_name", OP_SETS)
def test_op_set_reads_shared_prefix_blocks_as_the_oracle(ops_name, preset_name):
    """Request 1 reads request 0's first two blocks (a prefix-cache hit, ``own_from`` 2): its chunk and
    its decode rows match the oracle, outputs and page bytes; the writer decodes alongside, then the
    reader decodes alone: the shared blocks stay byte for byte as the writer left them."""
    ops = op_set(ops_name)
    cfg = _config(preset_name)
    lay, regions, table = _pages(cfg, seed=2)
    table[1, :2] = table[0, :2]                       # the shared prefix blocks
    qkv = [structured_qkv(60, GROUP * HKV, HKV, D, seed=20 + i) for i in range(2)]
    qkv[1] = tuple(torch.cat([x[:32], y[32:]]) for x, y in zip(qkv[0], qkv[1]))   # same first 32 tokens
    ref.forward_request(regions, lay, cfg, table[0], 0, *(x[:40] for x in qkv[0]), SCALE)   # the writer
    mine, oracle = regions.clone(), regions.clone()
    q, k, v = (x[32:44] for x in qkv[1])
    got = ops.forward_chunks(mine, lay, cfg, table[1:2], [32], torch.tensor([[0, 12]]), q, k, v, SCALE, [2])
    want = ref.forward_chunks(oracle, lay, cfg, table[1:2], [32], torch.tensor([[0, 12]]), q, k, v, SCALE, [2])
    _check(lay, got, want, mine, oracle, f"{ops_name} reader chunk")
    shared = table[0, :2].long()
    assert torch.equal(mine[shared], regions[shared]), f"{ops_name}: the reader's chunk wrote into shared blocks"
    pos = [40, 44]
    for step in range(DECODE_STEPS):      # writer and reader decode together
        q, k, v = (torch.stack([qkv[i][j][p] for i, p in enumerate(pos)]) for j in range(3))
        got = ops.forward_decode(mine, lay, cfg, table[:2], pos, q, k, v, SCALE, [0, 2])
        want = ref.forward_decode(oracle, lay, cfg, table[:2], pos, q, k, v, SCALE, [0, 2])
        _check(lay, got, want, mine, oracle, f"{ops_name} shared decode step {step}")
        pos = [p + 1 for p in pos]
    blocks = table[0, :2].long()          # the prefix's lo copies stay as the writer wrote them
    assert torch.equal(lay.views(mine).k_lo[blocks], lay.views(regions).k_lo[blocks])
    before = mine[shared].clone()
    for step in range(DECODE_STEPS):      # the reader alone (a batch of one shared row)
        q, k, v = (qkv[1][j][pos[1]][None] for j in range(3))
        got = ops.forward_decode(mine, lay, cfg, table[1:2], pos[1:], q, k, v, SCALE, [2])
        want = ref.forward_decode(oracle, lay, cfg, table[1:2], pos[1:], q, k, v, SCALE, [2])
        _check(lay, got, want, mine, oracle, f"{ops_name} reader decode step {step}")
        assert torch.equal(mine[shared], before), f"{ops_name}: the reader's decode wrote into shared blocks"
        pos[1] += 1


@pytest.mark.parametrize("ops_name", OP_SETS)
def test_step_plan_is_reused_by_every_layer(ops_name):
    """One plan, prepared once, serves several layers (pages) in a row: each layer's result equals a
    fresh unplanned call on a copy of that layer's pages."""
    from mikv_vllm.ops import PlanBuilder, StepPlan

    ops = op_set(ops_name)
    cfg = preset("mikv")
    layers = [_pages(cfg, seed=s) for s in (3, 4, 5)]
    lay = layers[0][0]
    table = layers[0][2]
    for _, regions, _ in layers:          # a cached context per layer
        for i in range(3):
            ref.forward_request(regions, lay, cfg, table[i], 0, *structured_qkv(30 + i, GROUP * HKV, HKV, D, seed=i),
                                SCALE)
    pos = torch.tensor([30, 31, 32])
    builder = PlanBuilder(cfg, lay, max_rows=8, max_cols=6)
    plan = StepPlan(decode=builder.decode(torch.arange(3), pos, table, None))
    ops.prepare(plan, lay, cfg, GROUP * HKV, HKV)
    for s, (_, regions, _) in enumerate(layers):
        q, k, v = (x[:3] for x in structured_qkv(3, GROUP * HKV, HKV, D, seed=40 + s))
        fresh = regions.clone()
        got = ops.decode(regions, lay, cfg, plan.decode, q, k, v, SCALE)
        want = ops.forward_decode(fresh, lay, cfg, table, pos, q, k, v, SCALE)
        assert torch.equal(got, want) and torch.equal(regions, fresh), s
