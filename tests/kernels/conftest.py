"""Kernel tests run on CPU tensors through the Triton interpreter.

Triton reads TRITON_INTERPRET when ``@triton.jit`` decorates the kernels (import time)
and again while interpreting. It is set here before the kernels are imported, restored
afterwards (so it does not leak into other directories' subprocesses, e.g. vllm
servers), and set again around every test of this directory.
"""

import os

import pytest

_before = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    pytest.importorskip("triton")
    from mikv_vllm.kernels import decode as _decode

    if type(_decode._split_kernel).__name__ != "InterpretedFunction":
        raise RuntimeError("triton was imported before tests/kernels/conftest.py set TRITON_INTERPRET=1; "
                           "run with TRITON_INTERPRET=1 or collect tests/kernels first")
finally:
    if _before is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _before


@pytest.fixture(autouse=True)
def _triton_interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
