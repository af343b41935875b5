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
