"""The engine processes of a CPU server preload the system's tcmalloc (vllm_glue/allocator.py)."""

from __future__ import annotations

import logging

import pytest

from mikv_vllm import envs
from mikv_vllm.vllm_glue import allocator


@pytest.fixture
def fake_lib(tmp_path):
    (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")
    return tmp_path


def test_prepends_the_system_tcmalloc(fake_lib, monkeypatch):
    monkeypatch.delenv(envs.CPU_MALLOC, raising=False)
    env = {"LD_PRELOAD": "/opt/libiomp5.so"}
    path = allocator.preload_tcmalloc(env, (str(fake_lib),))
    assert path == str(fake_lib / "libtcmalloc_minimal.so.4")
    assert env["LD_PRELOAD"] == f"{path}:/opt/libiomp5.so"
    env = {}
    allocator.preload_tcmalloc(env, (str(fake_lib),))
    assert env["LD_PRELOAD"] == path


def test_leaves_a_preloaded_tcmalloc_and_the_system_switch(fake_lib, monkeypatch):
    env = {"LD_PRELOAD": "/x/libtcmalloc.so.4"}
    assert allocator.preload_tcmalloc(env, (str(fake_lib),)) is None
    assert env == {"LD_PRELOAD": "/x/libtcmalloc.so.4"}
    monkeypatch.setenv(envs.CPU_MALLOC, "system")
    env = {}
    assert allocator.preload_tcmalloc(env, (str(fake_lib),)) is None and env == {}


def test_warns_without_tcmalloc(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(envs.CPU_MALLOC, raising=False)
    monkeypatch.setattr(allocator.ctypes.util, "find_library", lambda name: None)
    env = {}
    with caplog.at_level(logging.WARNING, logger="vllm.mikv"):
        assert allocator.preload_tcmalloc(env, (str(tmp_path),)) is None
    assert env == {} and "libtcmalloc-minimal4" in caplog.text
