"""The ISA variants of the C++ CPU op: the compiler flags of each and the CPU features it needs.

Every variant is one complete extension module compiled with its own flags (the kernels pick their
SIMD paths with ``#if defined(__AVX512F__)`` etc., which only ``-m``/``-march`` flags define), so no
code of one ISA level reaches a module of another: no shared inline/template symbols, no wide
instructions in static initialisers of a module the CPU cannot run. The loader imports only the
variant the CPU supports (``/proc/cpuinfo``), best first, unless ``MIKV_CPU_ISA`` names one.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

# x86-64-v2/v3 features (the kernel's AVX2 / F16C / FMA paths and what -march=x86-64-v3 may emit)
_V3 = ("cx16", "popcnt", "sse4_1", "sse4_2", "ssse3", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm",
       "movbe", "xsave")
_V4 = ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")


@dataclass(frozen=True)
class Variant:
    """One build of the op: ``cflags`` added to the common ones; ``needs``: /proc/cpuinfo flags."""

    name: str
    cflags: tuple[str, ...]
    needs: tuple[str, ...] = ()


X86_64 = (
    Variant("avx512", ("-march=x86-64-v4", "-mavx512vnni", "-mavx512vbmi", "-mprefer-vector-width=512"),
            _V3 + _V4 + ("avx512_vnni", "avx512vbmi")),
    Variant("avx2", ("-march=x86-64-v3",), _V3),
    Variant("baseline", ("-march=x86-64", "-mtune=generic")),
)
PORTABLE = (Variant("baseline", ()),)   # aarch64 (NEON is part of armv8-a) and anything else: compiler defaults


def is_x86_64(machine: str | None = None) -> bool:
    return (machine or platform.machine()).lower() in ("x86_64", "amd64")


def for_machine(machine: str | None = None) -> tuple[Variant, ...]:
    """The variants built for ``machine`` (default: this one), best first."""
    return X86_64 if is_x86_64(machine) else PORTABLE


def by_name(name: str, machine: str | None = None) -> Variant:
    for v in for_machine(machine):
        if v.name == name:
            return v
    known = ", ".join(v.name for v in for_machine(machine))
    raise ValueError(f"no C++ op variant {name!r} on {machine or platform.machine()} (variants: {known})")


def cpu_features(cpuinfo: str | None = None) -> frozenset[str]:
    """The flags of the first ``flags`` (x86) / ``Features`` (arm) line of /proc/cpuinfo (empty if unreadable:
    only the baseline variant then counts as runnable)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def missing(variant: Variant, features: frozenset[str]) -> list[str]:
    """The CPU features ``variant`` needs that ``features`` lacks (empty: it runs here)."""
    return [f for f in variant.needs if f not in features]


def runnable(features: frozenset[str] | None = None, machine: str | None = None) -> list[Variant]:
    """The variants this CPU runs, best first (the last is always the baseline)."""
    features = cpu_features() if features is None else features
    return [v for v in for_machine(machine) if not missing(v, features)]
