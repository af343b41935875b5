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
    select.check_supports(split, "cpu")        # the C++ op stores keys and values at their own widths


def test_get_ops_with_layout(monkeypatch):
    monkeypatch.setenv("MIKV_VLLM_OPS", "torch")
    split = RegionLayout.build(preset("mikv").replace(v_bits=3), 16, 64)
    assert select.get_ops("cpu", split).name == "torch"
    monkeypatch.setattr(select, "_choose_ops", lambda device: type("Ops", (), {"name": "triton"}))
    with pytest.raises(RuntimeError, match="'triton' does not support"):
        select.get_ops("cpu", split)
    assert select.get_ops("cpu", RegionLayout.build(preset("mikv"), 16, 64)).name == "triton"
    monkeypatch.setattr(select, "_choose_ops", lambda device: type("Ops", (), {"name": "cpu"}))
    assert select.get_ops("cpu", split).name == "cpu"


def test_backend_refuses_split_widths_on_the_triton_op(monkeypatch):
    """The backend's plans pick the op set with the layout: a k != v config on an op set that refuses it
    (Triton, faked here on CPU) fails at engine setup naming the op set; with MIKV_VLLM_OPS=torch it is served."""
    from mikv_vllm.vllm_glue.backend import MiKVMetadataBuilder

    cfg = preset("mikv").replace(v_bits=3)
    builder = MiKVMetadataBuilder.__new__(MiKVMetadataBuilder)
    monkeypatch.setattr(select, "_choose_ops", lambda device: type("Ops", (), {"name": "triton"}))
    with pytest.raises(RuntimeError, match="'triton' does not support keys and values at different widths"):
        builder.init_plans(cfg, 16, 64, 6, 2, max_rows=2, max_cols=4, device="cpu")
    monkeypatch.undo()
    monkeypatch.setenv("MIKV_VLLM_OPS", "torch")
    builder.init_plans(cfg, 16, 64, 6, 2, max_rows=2, max_cols=4, device="cpu")
    assert builder.ops.name == "torch" and builder.layout.v_bits == 3
