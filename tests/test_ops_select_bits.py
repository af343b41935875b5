"""Op-set selection refuses a layout with k_bits != v_bits for the op sets that do not support it yet."""

import pytest

from mikv_vllm.config import preset
from mikv_vllm.core.layout import RegionLayout
from mikv_vllm.ops import select


def test_check_supports_names_op_set_and_widths():
    split = RegionLayout.build(preset("mikv").replace(v_bits=3), 16, 64)
    same = RegionLayout.build(preset("mikv"), 16, 64)
    for name in sorted(select.NO_SPLIT_BITS):
        with pytest.raises(RuntimeError, match=rf"op set '{name}'.*k_bits 4, v_bits 3.*MIKV_VLLM_OPS=torch"):
            select.check_supports(split, name)
        select.check_supports(same, name)
    select.check_supports(split, "torch")


def test_get_ops_with_layout(monkeypatch):
    monkeypatch.setenv("MIKV_VLLM_OPS", "torch")
    split = RegionLayout.build(preset("mikv").replace(v_bits=3), 16, 64)
    assert select.get_ops("cpu", split).name == "torch"
    monkeypatch.setattr(select, "_choose_ops", lambda device: type("Ops", (), {"name": "cpu"}))
    with pytest.raises(RuntimeError, match="'cpu' does not support"):
        select.get_ops("cpu", split)
    assert select.get_ops("cpu", RegionLayout.build(preset("mikv"), 16, 64)).name == "cpu"
