"""Building and loading the C++ CPU op: ISA variants, portable flags, install-time builds, the
engine-start fallback and its errors. Most tests build a tiny stand-in module (seconds, not minutes)
through the real build pipeline; tests/cpu/test_isa_variants.py runs the real op per variant."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest

from mikv_vllm import envs
from mikv_vllm.cpu import CpuOpBuildError, build
from mikv_vllm.cpu import variants as isa

ROOT = Path(__file__).resolve().parents[2]

# A stand-in for mikv_cpu.cpp: the same module name define, ISA define and SIMD report, no kernels.
TINY = r"""
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <string>
#include <vector>
#define S_(x) #x
#define S(x) S_(x)
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("ISA") = S(MIKV_ISA);
  std::vector<std::string> simd;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  simd.push_back("avx512");
#endif
#if defined(__AVX512VNNI__)
  simd.push_back("avx512vnni");
#endif
#if defined(__AVX512VBMI__)
  simd.push_back("avx512vbmi");
#endif
#if defined(__AVX2__) && defined(__FMA__)
  simd.push_back("avx2");
#endif
#if defined(__F16C__)
  simd.push_back("f16c");
#endif
  m.attr("SIMD") = simd;
  m.def("hi_roundtrip", [](pybind11::object x, int) {   // what check_image.py calls: fp16 round trip via torch
    return pybind11::make_tuple(pybind11::none(), x.attr("half")().attr("float")());
  });
}
"""
SIMD = {"avx512": {"avx512", "avx512vnni", "avx512vbmi", "avx2", "f16c"}, "avx2": {"avx2", "f16c"}, "baseline": set()}
ZEN4 = frozenset("fma cx16 sse4_1 sse4_2 ssse3 movbe popcnt xsave avx f16c abm bmi1 avx2 bmi2 avx512f avx512dq "
                 "avx512cd avx512bw avx512vl avx512vbmi avx512_vnni".split())
SKYLAKE_X = ZEN4 - {"avx512vbmi", "avx512_vnni"}      # AVX-512 without VNNI/VBMI: the avx2 variant
SANDY_BRIDGE = frozenset("cx16 sse4_1 sse4_2 ssse3 popcnt xsave avx".split())


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """build.py pointed at the stand-in source, an empty prebuilt dir and an empty cache dir."""
    src = tmp_path / "src" / "mikv_cpu.cpp"
    src.parent.mkdir()
    src.write_text(TINY)
    monkeypatch.setattr(build, "SOURCES", [src])
    monkeypatch.setattr(build, "HEADERS", [])
    monkeypatch.setattr(build, "PREBUILT_DIR", tmp_path / "prebuilt")
    monkeypatch.setattr(build, "_ACTIVE", None)
    monkeypatch.setattr(build, "_MODULES", {})
    monkeypatch.setenv(envs.CPU_BUILD_DIR, str(tmp_path / "cache"))
    monkeypatch.delenv(envs.CPU_ISA, raising=False)
    return tmp_path


def _no_compiler(*_a, **_k):
    raise AssertionError("compiled although a build existed")


x86_only = pytest.mark.skipif(not isa.is_x86_64(), reason="x86-64 variants")


def test_no_march_native_anywhere():
    out = subprocess.run(["grep", "-rnI", "march=native", str(ROOT / "mikv_vllm")], capture_output=True, text=True)
    assert out.returncode == 1 and out.stdout == "", out.stdout


def test_cpu_features_and_runnable_variants():
    cpuinfo = "processor\t: 0\nflags\t\t: fpu " + " ".join(sorted(ZEN4)) + "\nbugs\t: x\nprocessor\t: 1\nflags\t: fpu\n"
    assert isa.cpu_features(cpuinfo) == ZEN4 | {"fpu"}       # the first CPU's flags
    assert isa.cpu_features("Features\t: fp asimd evtstrm\n") == {"fp", "asimd", "evtstrm"}
    assert isa.cpu_features("nothing here\n") == frozenset()
    names = lambda feats, m="x86_64": [v.name for v in isa.runnable(feats, m)]  # noqa: E731
    assert names(ZEN4) == ["avx512", "avx2", "baseline"]
    assert names(SKYLAKE_X) == ["avx2", "baseline"]
    assert names(SANDY_BRIDGE) == ["baseline"]
    assert names(frozenset()) == ["baseline"]
    assert names(ZEN4, "aarch64") == ["baseline"] and names(frozenset(), "AMD64")[-1] == "baseline"
    assert [v.name for v in isa.for_machine("aarch64")] == ["baseline"]
    assert all(not v.cflags or not any("x86" in f or f.startswith("-mavx") for f in v.cflags)
               for v in isa.for_machine("aarch64"))   # no x86 flag reaches an arm build


def test_select_follows_the_switch_and_the_cpu(monkeypatch):
    monkeypatch.setattr(isa, "cpu_features", lambda cpuinfo=None: SKYLAKE_X)
    monkeypatch.setattr(isa, "is_x86_64", lambda machine=None: True)
    monkeypatch.delenv(envs.CPU_ISA, raising=False)
    assert build.select().name == "avx2"
    monkeypatch.setenv(envs.CPU_ISA, "baseline")
    assert build.select().name == "baseline"
    monkeypatch.setenv(envs.CPU_ISA, "AVX512")
    with pytest.raises(CpuOpBuildError, match=r"MIKV_CPU_ISA=avx512: this CPU lacks avx512_vnni, avx512vbmi"
                                              r" \(variants it runs: avx2, baseline\)"):
        build.select()
    monkeypatch.setenv(envs.CPU_ISA, "sse9")
    with pytest.raises(ValueError, match="MIKV_CPU_ISA='sse9'"):
        build.select()
    monkeypatch.setattr(isa, "is_x86_64", lambda machine=None: False)
    monkeypatch.setenv(envs.CPU_ISA, "avx2")
    with pytest.raises(CpuOpBuildError, match="no C.. op variant 'avx2'"):
        build.select()


def test_module_names_differ_by_variant_and_source(tiny):
    names = {v.name: build.module_name(v) for v in isa.for_machine()}
    assert len(set(names.values())) == len(names) and all(n.startswith(f"mikv_cpu_{k}_") for k, n in names.items())
    build.SOURCES[0].write_text(TINY + "// edited\n")
    assert {v.name: build.module_name(v) for v in isa.for_machine()}.keys() == names.keys()
    assert all(build.module_name(v) != names[v.name] for v in isa.for_machine())


def test_build_every_variant_then_load_without_a_compiler(tiny, monkeypatch):
    paths = build.build(list(isa.for_machine()), build.PREBUILT_DIR)
    assert sorted(paths) == sorted(v.name for v in isa.for_machine())
    assert all(p.is_file() and p.parent == build.PREBUILT_DIR for p in paths.values())
    monkeypatch.setattr(build, "_compile", _no_compiler)
    assert build.build(list(isa.for_machine()), build.PREBUILT_DIR) == paths       # idempotent: nothing compiles
    for v in isa.runnable():
        module = build.load_variant(v, build_missing=False)
        assert module.ISA == v.name
        if isa.is_x86_64():
            assert set(module.SIMD) == SIMD[v.name], (v.name, module.SIMD)   # the variant's flags, nothing wider
    assert build.load().ISA == isa.runnable()[0].name                             # auto: the best this CPU runs


def test_engine_start_fallback_builds_once_and_logs(tiny, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="vllm.mikv")
    module = build.load()
    cached = list((tiny / "cache").glob("mikv_cpu_*.so"))
    assert [p.stem for p in cached] == [module.__name__] and module.ISA == isa.runnable()[0].name
    text = caplog.text
    assert "no prebuilt C++ CPU op" in text and "mikv-vllm build-ops" in text
    assert "built the C++ CPU op" in text and text.index("no prebuilt") < text.index("built the")
    monkeypatch.setattr(build, "_ACTIVE", None)
    monkeypatch.setattr(build, "_MODULES", {})
    monkeypatch.setattr(build, "_compile", _no_compiler)
    assert build.load().__name__ == module.__name__                     # found in the cache: no second build


def test_prebuilt_wins_over_the_cache(tiny):
    v = isa.runnable()[0]
    build.build([v], tiny / "cache")
    build.build([v], build.PREBUILT_DIR)
    assert build.find(v) == build.PREBUILT_DIR / f"{build.module_name(v)}.so"


def test_missing_build_without_fallback_is_an_error(tiny):
    with pytest.raises(CpuOpBuildError, match="run `mikv-vllm build-ops`, or set MIKV_VLLM_OPS=torch"):
        build.load_variant(isa.runnable()[0], build_missing=False)


def test_missing_compiler_is_a_clear_error(tiny, monkeypatch):
    monkeypatch.setenv(envs.CXX, "/nonexistent/c++")
    with pytest.raises(CpuOpBuildError, match=r"needs a C\+\+17 compiler: '/nonexistent/c\+\+'.*MIKV_VLLM_OPS=torch"):
        build.load()


def test_unwritable_build_dir_is_a_clear_error(tiny, monkeypatch):
    blocker = tiny / "file"
    blocker.write_text("")
    monkeypatch.setenv(envs.CPU_BUILD_DIR, str(blocker / "sub"))
    with pytest.raises(CpuOpBuildError, match="MIKV_CPU_BUILD_DIR to a writable directory"):
        build.load()


def test_compile_error_carries_the_compiler_message(tiny):
    build.SOURCES[0].write_text("this is not C++;\n")
    with pytest.raises(CpuOpBuildError, match="MIKV_VLLM_OPS=torch") as info:
        build.load()
    assert "mikv_cpu.cpp" in str(info.value) and "error" in str(info.value)


def test_build_ops_command(tiny, capsys):
    from mikv_vllm.cli import main

    stale = build.PREBUILT_DIR / "mikv_cpu_avx2_000000000000.so"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"")
    assert main(["build-ops", "--isa", "baseline"]) == 0
    want = build.PREBUILT_DIR / f"{build.module_name(isa.by_name('baseline'))}.so"
    assert want.is_file() and not stale.exists()          # the package dir keeps the current sources' builds only
    assert str(want) in capsys.readouterr().out
    other = tiny / "elsewhere"
    assert main(["build-ops", "--isa", "runnable", "--dir", str(other)]) == 0
    assert sorted(p.stem for p in other.glob("*.so")) == sorted(build.module_name(v) for v in isa.runnable())
    assert main(["build-ops", "--isa", "sse9"]) == 2
    assert "no C++ op variant 'sse9'" in capsys.readouterr().err


def test_check_image_ops(tiny, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_image", ROOT / "deploy" / "check_image.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    first, *rest = isa.for_machine()
    build.build(rest, build.PREBUILT_DIR)
    errors = check.check_cpu_ops()
    assert errors and all("build-ops" in e for e in errors) and first.name in errors[0]   # a variant is missing
    build.build([first], tiny / "cache")                          # the fallback dir does not count for an image
    assert any(build.module_name(first) in e for e in check.check_cpu_ops())
    build.build([first], build.PREBUILT_DIR)
    monkeypatch.setattr(build, "_compile", _no_compiler)
    assert check.check_cpu_ops() == []
