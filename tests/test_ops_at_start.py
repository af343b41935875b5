"""The attention backend loads its op set when vLLM builds the model (engine start), so on CPU the C++
op is imported, or built, before the server reports healthy and never on a request (issue #24)."""

from __future__ import annotations

import math

import pytest

import mikv_vllm.cpu as cpu
from mikv_vllm import envs
from mikv_vllm.vllm_glue.backend import MiKVAttentionImpl


def _impl():
    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig(additional_config={"kv_cache_policy": "mikv"})):
        return MiKVAttentionImpl(6, 64, 1 / math.sqrt(64), 2)


@pytest.fixture
def loads(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu, "load", lambda: calls.append("load"))
    return calls


def test_impl_loads_the_cpu_op_at_construction(loads, monkeypatch):
    monkeypatch.delenv(envs.OPS, raising=False)
    _impl()
    assert loads == ["load"]            # loaded at construction, before any forward
    monkeypatch.setenv(envs.OPS, "cpu")
    _impl()
    assert loads == ["load", "load"]


def test_torch_ops_load_no_cpu_op(loads, monkeypatch):
    monkeypatch.setenv(envs.OPS, "torch")
    _impl()
    assert loads == []


def test_a_failed_build_fails_the_construction(monkeypatch):
    def broken():
        raise cpu.CpuOpBuildError("no compiler; set MIKV_VLLM_OPS=torch to run the torch reference instead")

    monkeypatch.setattr(cpu, "load", broken)
    monkeypatch.delenv(envs.OPS, raising=False)
    with pytest.raises(cpu.CpuOpBuildError, match="MIKV_VLLM_OPS=torch"):
        _impl()
