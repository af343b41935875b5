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
    lay = _layout(k_bits=4, v_bits=3, lo_bits=None, group_meta="fp8-scale")
    got = cpp_layout(lay)
    assert isinstance(got, load().Layout)
    assert (got.block_size, got.head_dim, got.k_bits, got.v_bits, got.group_meta, got.hi_slots,
            got.region_bytes) == (lay.block_size, lay.head_dim, 4, 3, 1, lay.hi_slots, lay.region_bytes)
    assert cpp_layout(lay) is got
    assert cpp_layout(_layout()).group_meta == 0


BAD = {
    "k_bits": (5, "k_bits 5 v_bits 4"),
    "v_bits": (1, "k_bits 4 v_bits 1"),
    "group_meta": (2, "group meta code 2"),
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
    """Each bad field raises naming itself (``k_bits``/``v_bits`` checked apart: a width the codes
    do not have in either)."""
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
    with pytest.raises(TypeError):
        load().Layout(**{k: v for k, v in fields.items() if k not in ("k_bits", "v_bits")}, bits=4)   # no `bits`
    load().Layout(**fields)   # the good fields construct


def test_keys_and_values_evicted_together():
    """One width 0 and the other not: neither an eviction layout nor a lo one."""
    fields = layout_fields(_layout())
    fields["v_bits"] = 0
    with pytest.raises(RuntimeError, match="mikv_cpu: k_bits 4 v_bits 0 .*both evicted or both kept"):
        load().Layout(**fields)


def test_fp8_meta_records_inside_the_region():
    """fp8-scale records are 3 bytes (1-byte aligned) and must fit: k_sz / v_sz placed at the region's
    end minus fewer bytes than N * groups * 3 raise."""
    lay = _layout(group_meta="fp8-scale")
    fields = layout_fields(lay)
    fields["v_sz"] = lay.region_bytes - lay.block_size * lay.groups * 3 + 1
    with pytest.raises(RuntimeError, match="mikv_cpu: layout puts v_sz"):
        load().Layout(**fields)
    fields["v_sz"] = lay.v_sz + 1            # odd offsets are fine for 3-byte records
    load().Layout(**fields)
