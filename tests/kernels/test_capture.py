"""A capture-shaped decode batch: metadata built through the backend's ``build_for_cudagraph_capture``
(padded rows at seq_len 0, as vLLM pads a captured batch), then the same builder's ``build`` for the
next steps (what a graph replay reads: the same buffers, refilled). Real rows equal the oracle,
padded rows leave every page byte untouched (their block-table rows point at live blocks here)."""

from __future__ import annotations

import math

import pytest
import torch

from core._helpers import assert_pages, make_regions, structured_qkv
from mikv_vllm.config import preset
from mikv_vllm.core import reference as ref
from mikv_vllm.core.layout import RegionLayout
from mikv_vllm.core.rotation import rotation_for

pytest.importorskip("vllm")

from vllm.v1.attention.backend import AttentionCGSupport, CommonAttentionMetadata  # noqa: E402

from mikv_vllm.vllm_glue.backend import MiKVMetadataBuilder  # noqa: E402

N, HKV, GROUP, D = 16, 2, 2, 32
SCALE = 1 / math.sqrt(D)
REAL, PADDED, COLS = 3, 2, 6


def _builder(cfg) -> MiKVMetadataBuilder:
    b = object.__new__(MiKVMetadataBuilder)   # no vllm config: the parts the engine's __init__ sets
    b.prefix_caching = False
    b.init_plans(cfg, N, D, HKV * GROUP, HKV, max_rows=8, max_cols=COLS, device="cpu")
    return b


def _common(seq: list[int], table: torch.Tensor) -> CommonAttentionMetadata:
    n = len(seq)
    qlen = [1 if s > 0 else 0 for s in seq]
    qsl = torch.tensor([0] + list(torch.tensor(qlen).cumsum(0).tolist()), dtype=torch.int32)
    seq_t = torch.tensor(seq, dtype=torch.int32)
    return CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq_t, num_reqs=n, num_actual_tokens=n,
        max_query_len=1, max_seq_len=max(seq), block_table_tensor=table, slot_mapping=torch.zeros(n, dtype=torch.int64),
        seq_lens_cpu_upper_bound=seq_t.clone())


@pytest.mark.parametrize("preset_name,tile", [("mikv", None), ("h2o", 4), ("mikv", 1), ("mikv-int3-r05", None)])
def test_capture_batch_with_padded_rows(preset_name, tile, monkeypatch):
    """``tile`` (4, 1): the upkeep walks each row's slots in several tiles. A rotated preset runs
    ``decode_rotated`` (the rotation in the kernels): the oracle gets the kernels' rotated copies."""
    from mikv_vllm.kernels import step

    monkeypatch.setenv("MIKV_VLLM_OPS", "triton")
    monkeypatch.setattr(step, "UPKEEP_TILE", tile)
    cfg = preset(preset_name)
    if tile:
        assert RegionLayout.build(cfg, N, D).hi_slots * 2 >= 2 * tile   # rows hold >= 2 blocks
    assert MiKVMetadataBuilder._cudagraph_support == AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    lay = RegionLayout.build(cfg, N, D)
    regions = make_regions(lay, 24, HKV, garbage=True, seed=3)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(3))
    table = torch.zeros(REAL + PADDED, COLS, dtype=torch.int32)
    table[:REAL] = perm[: REAL * COLS].reshape(REAL, COLS).int()
    table[REAL:] = table[0]                        # padded rows point at request 0's live blocks
    qkv = [structured_qkv(40, GROUP * HKV, HKV, D, seed=20 + i) for i in range(REAL)]
    ctx = [31, 9, 0]                               # request 0 enters a new block at step 1 (position 32)
    for i, c in enumerate(ctx):                    # prefill with the oracle
        if c:
            ref.forward_request(regions, lay, cfg, table[i], 0, *(x[:c] for x in qkv[i]), SCALE)
    if lay.hi_slots:                               # stale tags of an earlier owner in that block: reset at offset 0
        lay.views(regions).tag[int(table[0, 2])] = torch.arange(1, lay.hi_slots + 1, dtype=torch.int32)
    builder = _builder(cfg)
    mine, oracle = regions.clone(), regions.clone()
    buffers = None
    for step in range(3):
        seq = [c + 1 for c in ctx] + [0] * PADDED
        common = _common(seq, table)
        meta = builder.build_for_cudagraph_capture(common) if step == 0 else builder.build(0, common)
        dec = meta.decode
        assert dec is not None and dec.size == REAL + PADDED and dec.leading
        buf = dec.kernel["triton_step"][0]
        if buffers is None:
            buffers = {name: t.data_ptr() for name, t in vars(buf).items() if isinstance(t, torch.Tensor)}
        assert {name: t.data_ptr() for name, t in vars(buf).items() if isinstance(t, torch.Tensor)} == buffers
        q, k, v = (torch.cat([torch.stack([x[c] for x, c in zip(part, ctx)]),
                              torch.full((PADDED, *part[0].shape[1:]), float("nan"))])
                   for part in zip(*qkv))
        if cfg.rotation:
            rot = rotation_for(D)
            got = meta.ops.decode_rotated(mine, lay, cfg, dec, q, k, v, SCALE, rot)
            rows = (buf.qr[:REAL], buf.kr[:REAL], buf.vr[:REAL])
            want = rot.unrotate(ref.forward_decode(oracle, lay, cfg, table[:REAL], ctx, *rows, SCALE))
        else:
            got = meta.ops.decode(mine, lay, cfg, dec, q, k, v, SCALE)
            want = ref.forward_decode(oracle, lay, cfg, table[:REAL], ctx, q[:REAL], k[:REAL], v[:REAL], SCALE)
        torch.testing.assert_close(got[:REAL], want, rtol=1e-4, atol=1e-4)
        assert (got[REAL:] == 0).all()
        assert_pages(lay, mine, oracle, f"{preset_name} capture step {step}")
        ctx = [c + 1 for c in ctx]


@pytest.mark.parametrize("preset_name", ["mikv", "mikv-int3-r05", "mikv-paper"])
def test_capture_batch_with_shared_and_padded_rows(preset_name, monkeypatch):
    """Prefix caching on the captured path: row 1 was admitted with a 2-block hit on row 0's blocks
    (``own_from`` 2, from :mod:`vllm_glue.sharing`), row 0 (the writer) and row 2 decode alongside,
    two padded rows (beyond the recorded admissions) point at the shared blocks. Real rows equal the
    oracle (which runs them in order: the writer first), padded rows write nothing, and the reader
    writes nothing into the shared blocks: their bytes change only where the writer's own steps do."""
    from mikv_vllm.vllm_glue import sharing

    monkeypatch.setenv("MIKV_VLLM_OPS", "triton")
    cfg = preset(preset_name)
    lay = RegionLayout.build(cfg, N, D)
    regions = make_regions(lay, 24, HKV, garbage=True, seed=5)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(5))
    table = torch.zeros(REAL + PADDED, COLS, dtype=torch.int32)
    table[:REAL] = perm[: REAL * COLS].reshape(REAL, COLS).int()
    table[1, :2] = table[0, :2]                    # the reader's hit: the writer's first two blocks
    table[REAL:] = table[1]
    qkv = [structured_qkv(60, GROUP * HKV, HKV, D, seed=30 + i) for i in range(REAL)]
    qkv[1] = tuple(torch.cat([x[:32], y[32:]]) for x, y in zip(qkv[0], qkv[1]))   # same first 32 tokens
    # the writer's prefix fills the shared blocks exactly: its recent tokens' hi copies lie in them
    # (tags past shared_hi, which the reader must not use), and it decodes into its own third block
    ctx, admitted, own = [32, 37, 12], [0, 32, 0], [0, 2, 0]
    ref.forward_request(regions, lay, cfg, table[0], 0, *(x[:32] for x in qkv[0]), SCALE)           # the writer
    ref.forward_request(regions, lay, cfg, table[1], 32, *(x[32:37] for x in qkv[1]), SCALE, own_from=2)
    ref.forward_request(regions, lay, cfg, table[2], 0, *(x[:12] for x in qkv[2]), SCALE)
    builder = _builder(cfg)
    builder.prefix_caching = True
    mine, oracle = regions.clone(), regions.clone()
    shared = table[0, :2].long()
    for step in range(3):
        seq = [c + 1 for c in ctx] + [0] * PADDED
        sharing._state.rows = admitted             # what sharing.py records for the real rows
        try:
            common = _common(seq, table)
            meta = builder.build_for_cudagraph_capture(common) if step == 0 else builder.build(0, common)
        finally:
            sharing._state.rows = None
        dec = meta.decode
        assert meta.serial is None and dec is not None and dec.size == REAL + PADDED and dec.shared
        assert dec.own_from.tolist() == own + [0] * PADDED
        buf = dec.kernel["triton_step"][0]
        assert buf.own[:REAL + PADDED].tolist() == own + [0] * PADDED
        q, k, v = (torch.cat([torch.stack([x[c] for x, c in zip(part, ctx)]),
                              torch.full((PADDED, *part[0].shape[1:]), float("nan"))])
                   for part in zip(*qkv))
        writer_only = oracle.clone()               # the writer's step alone: what the shared blocks may become
        if cfg.rotation:
            rot = rotation_for(D)
            got = meta.ops.decode_rotated(mine, lay, cfg, dec, q, k, v, SCALE, rot)
            rows = (buf.qr[:REAL], buf.kr[:REAL], buf.vr[:REAL])
            ref.forward_request(writer_only, lay, cfg, table[0], ctx[0], *(x[:1] for x in rows), SCALE)
            want = rot.unrotate(ref.forward_decode(oracle, lay, cfg, table[:REAL], ctx, *rows, SCALE, own))
        else:
            got = meta.ops.decode(mine, lay, cfg, dec, q, k, v, SCALE)
            ref.forward_request(writer_only, lay, cfg, table[0], ctx[0], q[:1], k[:1], v[:1], SCALE)
            want = ref.forward_decode(oracle, lay, cfg, table[:REAL], ctx, q[:REAL], k[:REAL], v[:REAL], SCALE, own)
        torch.testing.assert_close(got[:REAL], want, rtol=1e-4, atol=1e-4)
        assert (got[REAL:] == 0).all()
        assert_pages(lay, mine, oracle, f"{preset_name} shared capture step {step}")
        assert_pages(lay, mine[shared], writer_only[shared], f"{preset_name} shared blocks, step {step}")
        ctx = [c + 1 for c in ctx]
