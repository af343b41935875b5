"""Every ISA variant of the C++ op that this CPU runs agrees with the torch reference: ``MIKV_CPU_ISA``
selects each in turn for representative cases of test_cpu_ops / test_cpu_prefill (those files run the
automatic choice in full; the decode steps include the hi-set upkeep). A variant without a build is
built first (minutes; setup.sh prebuilds all)."""

from __future__ import annotations

import pytest

from cpu import test_cpu_ops as dec
from cpu import test_cpu_prefill as pre
from cpu import test_cpu_qdot as qd
from mikv_vllm import envs
from mikv_vllm.cpu import build
from mikv_vllm.cpu import variants as isa

SIMD = {"avx512": {"avx512", "avx512vnni", "avx512vbmi", "avx2", "f16c"}, "avx2": {"avx2", "f16c"}, "baseline": set()}


@pytest.fixture(params=[v.name for v in isa.runnable()])
def variant(request, monkeypatch):
    """The C++ op of one variant as the active one (restored afterwards)."""
    monkeypatch.setenv(envs.CPU_ISA, request.param)
    monkeypatch.setattr(build, "_ACTIVE", None)
    module = build.load()
    assert module.ISA == request.param and module.__name__.startswith(f"mikv_cpu_{request.param}_")
    return module


def test_variant_has_its_simd_paths(variant):
    if isa.is_x86_64():
        assert set(variant.SIMD) == SIMD[variant.ISA], variant.SIMD
    else:
        assert not {"avx512", "avx2", "f16c"} & set(variant.SIMD)


@pytest.mark.parametrize("name", ["mikv", "int4-fp32-hi", "int8-bf16-hi-nobal-g8", "int3-fp8-hi-g64", "h2o",
                                  "int4-r03", "k2v4-g16-fp16-hi"])
def test_decode_steps_match_reference(variant, name):
    dec.test_forward_decode_steps_match_reference(name)


@pytest.mark.parametrize("name", ["mikv", "int8-bf16-hi-nobal-g8", "mikv-window", "int4-r03",
                                  "k8v3-fp8-scale-g8-nobal"])
def test_prefill_then_decode_match_reference(variant, name):
    pre.test_prefill_chunks_then_decode_match_reference(name)


@pytest.mark.parametrize("name", ["mikv", "k8v2-fp8-scale-g8-gqa1"])
def test_int8_qk_at_key_width_matches_the_model(variant, name, monkeypatch):
    """The int8 QK path (VNNI / AVX2 maddubs / scalar dot products) on keys at their own width."""
    qd.test_int8_decode_steps_match_the_model(name, monkeypatch)


def test_hi_conversions_match_torch(variant):
    dec.test_hi_roundtrip_fp8_matches_torch()
