import pytest


@pytest.fixture(autouse=True)
def exact_qk(monkeypatch):
    """The oracle comparisons here run the C++ op's exact QK path (``MIKV_CPU_QK=fp32``: the
    reference's logits up to fp32 rounding); the int8 path is checked against its own torch model
    in ``test_cpu_qdot.py``, whose tests set ``int8``."""
    monkeypatch.setenv("MIKV_CPU_QK", "fp32")
