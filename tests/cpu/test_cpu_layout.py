"""The C++ op's ``Layout`` binding: built from keyword fields, checked once at construction (every
bad field raises with the field named), cached per (module, RegionLayout)."""

from __future__ import annotations

import pytest

from mikv_vllm.config import MiKVConfig
from mikv_vllm.core.layout import RegionLayout
from mikv_vllm.cpu import load
from mikv_vllm.cpu.ops import cpp_layout, layout_fields


def _layout(**kw):
    cfg = MiKVConfig(**{"policy": "mikv", "lo_bits": 4, "hi_ratio": 0.25, **kw})
    return RegionLayout.build(cfg, 16, 64)


def test_layout_carries_its_fields_and_is_cached():
    lay = _layout()
    got = cpp_layout(lay)
    assert isinstance(got, load().Layout)
    assert (got.block_size, got.head_dim, got.bits, got.hi_slots, got.region_bytes) == (
        lay.block_size, lay.head_dim, lay.bits, lay.hi_slots, lay.region_bytes)
    assert cpp_layout(lay) is got


BAD = {
    "bits": (5, "bits 5"),
    "group": (0, "group 0"),
    "hi_dtype": (4, "hi dtype code 4"),
    "score_dtype": (1, "score dtype code 1"),
    "region_bytes": (-8, "bad layout"),
    "hi_slots": (17, "bad layout"),
    "tag": (2, "tag at offset 2, not a multiple"),
    "k_sz": (1, "k_sz at offset 1, not a multiple"),
    "v_hi": (1 << 20, "v_hi .* outside the region"),
    "balancer": (-2, "balancer .* outside the region"),
}


@pytest.mark.parametrize("field", sorted(BAD))
def test_bad_field_raises_at_construction(field):
    fields = layout_fields(_layout())
    value, message = BAD[field]
    fields[field] = value
    with pytest.raises(RuntimeError, match=f"mikv_cpu: .*{message}"):
        load().Layout(**fields)


def test_fields_are_named_and_all_required():
    fields = layout_fields(_layout())
    with pytest.raises(TypeError):
        load().Layout(*fields.values())   # keyword only
    with pytest.raises(TypeError):
        load().Layout(**{k: v for k, v in fields.items() if k != "tag"})
    with pytest.raises(TypeError):
        load().Layout(**fields, slots=3)
    load().Layout(**fields)   # the good fields construct
