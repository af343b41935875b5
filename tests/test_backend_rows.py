"""The metadata builder indexes a step's rows once: one-token rows batched, multi-token chunks listed."""

from types import SimpleNamespace

import torch

from mikv_vllm.vllm_glue.backend import MiKVMetadataBuilder


def _build(qlens, ctxs, block_size=16, cols=12):
    builder = MiKVMetadataBuilder.__new__(MiKVMetadataBuilder)   # no engine config needed for build()
    builder.block_size = block_size
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
    assert meta.seq_lens == [5, 131, 1, 19] and meta.query_start_loc == [0, 5, 6, 7, 10]


def test_decode_only_step_is_leading():
    meta, table = _build([1, 1, 1], [3, 40, 17])
    assert meta.decode.leading and meta.decode.tokens.tolist() == [0, 1, 2] and meta.chunks == []
    assert meta.decode.block_table.shape == (3, 3)


def test_prefill_only_step_has_no_decode_rows():
    meta, _ = _build([4, 2], [0, 8])
    assert meta.decode is None and meta.chunks == [(0, 0, 4, 0), (1, 4, 6, 8)]
