"""The metadata builder indexes a step's rows once: one-token rows batched, multi-token chunks listed."""

from types import SimpleNamespace

import torch

from mikv_vllm.config import preset
from mikv_vllm.vllm_glue.backend import MiKVMetadataBuilder


def _build(qlens, ctxs, block_size=16, cols=12):
    from mikv_vllm.config import preset

    builder = MiKVMetadataBuilder.__new__(MiKVMetadataBuilder)   # no engine config needed for build()
    builder.init_plans(preset("mikv"), block_size, 64, 9, 3, max_rows=max(len(qlens), 8), max_cols=cols, device="cpu")
    qsl = torch.tensor([0] + list(torch.tensor(qlens).cumsum(0)), dtype=torch.int32)
    seq = torch.tensor(ctxs) + torch.tensor(qlens)
    table = torch.arange(len(qlens) * cols, dtype=torch.int32).reshape(len(qlens), cols)
    m = SimpleNamespace(num_reqs=len(qlens), query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq.int(),
                        block_table_tensor=table, slot_mapping=torch.zeros(int(qsl[-1]), dtype=torch.int64),
                        num_actual_tokens=int(qsl[-1]))
    return builder.build(0, m), table


def test_mixed_step_rows():
    # request 0: chunk of 5 at 0; 1: decode at 130; 2: first token (context 0); 3: chunk of 3 at 16
    meta, table = _build([5, 1, 1, 3], [0, 130, 0, 16])
    dec = meta.decode
    assert dec.tokens.tolist() == [5, 6] and dec.pos.tolist() == [130, 0] and not dec.leading
    assert dec.pos.dtype == torch.int64 and dec.block_table.dtype == torch.int32
    assert dec.block_table.is_contiguous() and dec.block_table.shape == (2, 130 // 16 + 1)
    assert torch.equal(dec.block_table, table[[1, 2], :9])
    assert meta.chunks == [(0, 0, 5, 0), (3, 7, 10, 16)]
    pre = meta.prefill                               # the chunks as one forward_chunks call
    assert pre.span == (0, 10) and not pre.dense and pre.rows.tolist() == [[0, 5], [7, 10]]
    assert pre.ctx.tolist() == [0, 16] and pre.tokens.tolist() == [0, 1, 2, 3, 4, 7, 8, 9]
    assert pre.local.tolist() == pre.tokens.tolist() and pre.block_table.dtype == torch.int32
    assert torch.equal(pre.block_table, table[[0, 3], :2]) and pre.block_table.is_contiguous()
    assert meta.seq_lens == [5, 131, 1, 19] and meta.query_start_loc == [0, 5, 6, 7, 10]
    assert meta.token_counts == (10, 8, 2)      # stored, prefill (chunks), decode (one-token rows)


def test_decode_only_step_is_leading():
    meta, table = _build([1, 1, 1], [3, 40, 17])
    assert meta.decode.leading and meta.decode.tokens.tolist() == [0, 1, 2] and meta.chunks == []
    assert meta.prefill is None
    assert meta.decode.block_table.shape == (3, 3) and meta.token_counts == (3, 0, 3)


def test_prefill_only_step_has_no_decode_rows():
    meta, _ = _build([4, 2], [0, 8])
    assert meta.decode is None and meta.chunks == [(0, 0, 4, 0), (1, 4, 6, 8)] and meta.token_counts == (6, 6, 0)
    pre = meta.prefill
    assert pre.span == (0, 6) and pre.dense and pre.tokens is None and pre.rows.tolist() == [[0, 4], [4, 6]]
    assert pre.block_table.shape == (2, 1)


def test_decode_rows_first_then_chunk():
    meta, table = _build([1, 1, 40], [9, 3, 100])
    pre = meta.prefill
    assert pre.span == (2, 42) and pre.dense and pre.rows.tolist() == [[0, 40]] and pre.ctx.tolist() == [100]
    assert torch.equal(pre.block_table, table[[2], :9])


def test_capture_shaped_batch_takes_the_batched_path():
    """vLLM's CUDA-graph capture / first-token batches: 512 one-token rows at context 0."""
    import math

    from mikv_vllm.config import preset
    from mikv_vllm.core.layout import RegionLayout
    from mikv_vllm.ops import get_ops

    meta, _ = _build([1] * 512, [0] * 512, block_size=128, cols=1)
    assert meta.chunks == [] and meta.decode.leading and meta.decode.pos.tolist() == [0] * 512
    ops = get_ops("cpu")
    cfg = preset("mikv")
    lay = RegionLayout.build(cfg, 128, 64)
    regions = torch.zeros(512, 3, lay.region_bytes, dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(512, h, 64, generator=gen) for h in (9, 3, 3))
    table = torch.arange(512, dtype=torch.int32)[:, None]     # _build's table has 1 column per request here
    out = ops.forward_decode(regions, lay, cfg, table, meta.decode.pos, q, k, v, 1 / math.sqrt(64))
    # a first token attends only to itself, and each request got its own balancer and sink
    assert torch.allclose(out, v.repeat_interleave(3, dim=1), atol=1e-6)
    views = lay.views(regions)
    assert (views.tag[:, :, 0] == 1).all() and (views.balancer != 0).any(dim=-1).all()


def test_engines_built_one_after_another_see_their_own_config():
    """customize_spec's config: the latest engine built in the process, not a process-wide conflict."""
    from mikv_vllm.config import preset
    from mikv_vllm.vllm_glue import backend

    backend._publish(preset("mikv"))
    assert backend.active_config().name == "mikv"
    backend._publish(preset("mikv-int4"))          # a second engine with another preset
    assert backend.active_config().name == "mikv-int4"


def _build_shared(qlens, ctxs, admitted, table, block_size=16):
    from mikv_vllm.vllm_glue import sharing

    from mikv_vllm.config import preset

    builder = MiKVMetadataBuilder.__new__(MiKVMetadataBuilder)
    builder.init_plans(preset("mikv"), block_size, 64, 9, 3, max_rows=8, max_cols=table.shape[1], device="cpu")
    builder.prefix_caching = True
    qsl = torch.tensor([0] + list(torch.tensor(qlens).cumsum(0)), dtype=torch.int32)
    seq = torch.tensor(ctxs) + torch.tensor(qlens)
    m = SimpleNamespace(num_reqs=len(qlens), query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq.int(),
                        block_table_tensor=table, slot_mapping=torch.zeros(int(qsl[-1]), dtype=torch.int64),
                        num_actual_tokens=int(qsl[-1]))
    sharing._state.rows = admitted
    try:
        return builder.build(0, m)
    finally:
        sharing._state.rows = None


def test_rows_get_their_first_owned_block_from_admission():
    # 0: decode of a request admitted with a 2-block hit; 1: plain decode; 2: chunk after a 1-block hit
    table = torch.arange(36, dtype=torch.int32).reshape(3, 12)
    meta = _build_shared([1, 1, 4], [40, 20, 16], [32, 0, 16], table)
    assert meta.own_from == [2, 0, 1] and meta.serial is None
    assert meta.decode.own_from.tolist() == [2, 0] and meta.chunks == [(2, 2, 6, 16)]
    sinks = preset("mikv").sink_tokens            # the stable hi copies of a shared prefix: its sinks
    assert meta.decode.shared and meta.decode.shared_hi.tolist() == [sinks, 0]
    assert meta.prefill.own_from.tolist() == [1] and meta.prefill.shared_hi.tolist() == [sinks]
    plain = _build_shared([1, 1], [40, 20], [0, 0], table[:2])
    assert plain.own_from is None and not plain.decode.shared and plain.decode.own_from.tolist() == [0, 0]
    dummy = _build_shared([1, 1], [40, 20], None, table[:2])   # dummy / profiling run
    assert dummy.own_from is None


def test_reader_of_blocks_written_this_step_runs_after_the_writer():
    # row 1 (a hit on row 0's first 2 blocks, scheduled in the same step) comes first in the batch
    table = torch.tensor([[5, 6, 7, 0], [5, 6, 9, 0], [1, 2, 3, 4]], dtype=torch.int32)
    meta = _build_shared([8, 40, 1], [32, 0, 50], [32, 0, 0], torch.stack([table[1], table[0], table[2]]))
    assert meta.decode is None and meta.chunks == []
    order = [i for i, *_ in meta.serial]
    assert order.index(1) < order.index(0) and sorted(order) == [0, 1, 2]
    # the same rows a step later (the writer done): the normal batched path
    later = _build_shared([1, 1, 1], [40, 41, 51], [32, 0, 0], torch.stack([table[1], table[0], table[2]]))
    assert later.serial is None and later.decode.own_from.tolist() == [2, 0, 0]


def test_admitted_rows_must_match_the_batch():
    import pytest

    table = torch.arange(24, dtype=torch.int32).reshape(2, 12)
    with pytest.raises(RuntimeError, match="admitted rows"):
        _build_shared([1, 1], [40, 20], [32], table)
    # a captured batch's padding (seq_len 0) past the recorded rows: owns from block 0
    padded = _build_shared([1, 0], [40, 0], [32], table)
    assert padded.own_from == [2, 0]


def test_prefix_caching_decision(monkeypatch):
    import pytest

    monkeypatch.delenv("MIKV_VLLM_OPS", raising=False)

    from mikv_vllm.config import preset
    from mikv_vllm.vllm_glue.engine_config import MiKVUnsupportedError, prefix_caching

    assert prefix_caching(preset("mikv"), None) is True          # on by default, as stock
    assert prefix_caching(preset("mikv"), True) is True
    assert prefix_caching(preset("mikv"), False) is False        # --no-enable-prefix-caching
    assert prefix_caching(preset("h2o"), None) is False          # eviction: nothing to share
    with pytest.raises(MiKVUnsupportedError, match="evicted"):
        prefix_caching(preset("h2o"), True)


def test_prefix_caching_on_for_every_op_set(monkeypatch):
    """Every op set reads shared blocks (the Triton decode step too: tests/kernels/test_capture.py)."""
    from mikv_vllm.config import preset
    from mikv_vllm.vllm_glue.engine_config import prefix_caching

    for ops in ("triton", "torch", "cpu", "auto"):
        monkeypatch.setenv("MIKV_VLLM_OPS", ops)
        assert prefix_caching(preset("mikv"), None) is True
        assert prefix_caching(preset("mikv"), True) is True
