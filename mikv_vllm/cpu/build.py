"""Build and load the C++ CPU op (``mikv_cpu.cpp`` bindings, ``mikv_decode.cpp``, ``mikv_prefill.cpp``,
shared ``mikv_*.h`` headers): one complete extension module per ISA variant (:mod:`.variants`).

Where the loader finds a build, first match wins:

1. ``mikv_vllm/cpu/prebuilt/``: written at install time by ``mikv-vllm build-ops`` (or ``python -m
   mikv_vllm.cli build-ops``), which ``scripts/setup.sh`` and ``deploy/Dockerfile.cpu`` run after
   installing the package; it builds every variant of the machine's architecture.
2. ``$MIKV_CPU_BUILD_DIR`` (default ``~/.cache/mikv-vllm/torch_extensions``): the fallback, built
   when 1. has no build of the current sources. The MiKV attention backend loads the op when vLLM
   builds the model (engine start, before ``/health``), so this build runs then, logged with its
   duration, and never on a request.

A module's name carries a hash of the sources, every flag, torch's version and the Python ABI (not
the compiler: a build host's ``$CXX`` need not exist where the module runs): an
edited source never loads a stale build. The loader imports only the variant this CPU runs (best
first; ``MIKV_CPU_ISA`` picks one, and one the CPU lacks is an error). A failed build raises
:class:`CpuOpBuildError` with the compiler output and the ``MIKV_VLLM_OPS=torch`` way out: there is
no silent fallback. Builds use ninja and the host C++ compiler (``$CXX``, default ``c++``), with
portable flags only (never tuned to the build host).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import torch

from .. import envs
from . import variants as isa
from .variants import Variant

_HERE = Path(__file__).parent
SOURCES = [_HERE / "mikv_cpu.cpp", _HERE / "mikv_decode.cpp", _HERE / "mikv_prefill.cpp"]   # compiled and linked
HEADERS = sorted(_HERE.glob("*.h"))                              # every header: hashed into the build name
BINDING = "mikv_cpu"                                             # the source that defines the module
CFLAGS = ["-O3", "-fopenmp", "-DNDEBUG", "-fPIC", "-std=c++20", "-DTORCH_API_INCLUDE_EXTENSION_H"]
LDFLAGS = ["-shared", "-fopenmp"]
PREBUILT_DIR = _HERE / "prebuilt"
BUILD_DIR_ENV = envs.CPU_BUILD_DIR
WAY_OUT = "set MIKV_VLLM_OPS=torch to run the torch reference instead"

logger = logging.getLogger("vllm.mikv")  # child of vLLM's logger when vLLM runs

_LOCK = threading.Lock()
_ACTIVE = None                     # the module load() returns (the selected variant)
_MODULES: dict[str, object] = {}   # module name -> module, every variant imported in this process


class CpuOpBuildError(RuntimeError):
    """The C++ CPU op could not be compiled or loaded (message holds the cause and the way out)."""


def build_dir() -> Path:
    """``$MIKV_CPU_BUILD_DIR`` or ``~/.cache/mikv-vllm/torch_extensions`` (the engine-start fallback)."""
    return envs.cpu_build_dir()


def search_dirs() -> list[Path]:
    return [PREBUILT_DIR, build_dir()]


# ------------------------------------------------------------------ names and flags
def _compile_flags(variant: Variant) -> list[str]:
    return CFLAGS + list(variant.cflags) + [f"-DMIKV_ISA={variant.name}"]


def _link_flags() -> list[str]:
    libs = [f"-L{p}" for p in _torch_paths()[1]]
    return LDFLAGS + libs + ["-lc10", "-ltorch_cpu", "-ltorch", "-ltorch_python"]


def _torch_paths() -> tuple[list[str], list[str]]:
    from torch.utils.cpp_extension import include_paths, library_paths

    includes = include_paths("cpu") + [sysconfig.get_path("include", scheme="posix_prefix")]
    return includes, library_paths("cpu")


def module_name(variant: Variant) -> str:
    """``mikv_cpu_<variant>_<hash>``: the hash covers sources, headers, flags, torch and the Python ABI."""
    h = hashlib.sha256()
    for p in SOURCES + HEADERS:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    for part in (_compile_flags(variant), LDFLAGS, [torch.__version__, sysconfig.get_config_var("EXT_SUFFIX") or "",
                                                     platform.machine()]):
        h.update("\0".join(part).encode() + b"\1")
    return f"mikv_cpu_{variant.name}_{h.hexdigest()[:12]}"


def find(variant: Variant) -> Path | None:
    """The first existing build of ``variant`` for the current sources (prebuilt, then the build dir)."""
    name = module_name(variant)
    for d in search_dirs():
        path = d / f"{name}.so"
        if path.is_file():
            return path
    return None


# ------------------------------------------------------------------ building
def _ninja_path() -> str:
    candidates = []
    try:
        import ninja  # the PyPI package (the `cpu` extra) ships the binary

        candidates.append(Path(ninja.BIN_DIR) / "ninja")
    except ImportError:
        pass
    candidates += [Path(sys.executable).parent / "ninja", shutil.which("ninja")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return str(c)
    raise CpuOpBuildError(f"building the MiKV C++ CPU op needs ninja (pip install ninja, part of the 'cpu' extra); {WAY_OUT}")


def _esc(path: Path | str) -> str:
    """A path as a ninja build-line token."""
    return str(path).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def _ninja_file(todo: list[Variant], work: Path) -> str:
    import shlex

    includes, _ = _torch_paths()
    inc = " ".join(f"-isystem {shlex.quote(p)}" for p in includes)
    lines = ["ninja_required_version = 1.3", f"cxx = {shlex.quote(envs.cxx())}", "",
             "rule compile", "  command = $cxx -MMD -MF $out.d $cflags -c $in -o $out", "  depfile = $out.d",
             "  deps = gcc", "  description = compile $out", "",
             "rule link", "  command = $cxx $in $ldflags -o $out", "  description = link $out", ""]
    ldflags = " ".join(shlex.quote(f) for f in _link_flags())
    for v in todo:
        name = module_name(v)
        objects = []
        for src in SOURCES:
            obj = work / v.name / f"{src.stem}.o"
            objects.append(_esc(obj))
            extra = [f"-DTORCH_EXTENSION_NAME={name}"] if src.stem == BINDING else []  # the kernels' commands stay put
            flags = " ".join(shlex.quote(f) for f in _compile_flags(v) + extra)
            lines += [f"build {_esc(obj)}: compile {_esc(src)}", f"  cflags = {inc} {flags}"]
        lines += [f"build {_esc(work / (name + '.so'))}: link {' '.join(objects)}", f"  ldflags = {ldflags}", ""]
    return "\n".join(lines) + "\n"


def build(todo: list[Variant], out_dir: Path, verbose: bool | None = None) -> dict[str, Path]:
    """Compile the variants in ``todo`` that ``out_dir`` lacks (in parallel, one ninja run; objects
    kept in ``out_dir/build`` for incremental rebuilds) and install them as ``out_dir/<name>.so``.
    Concurrent callers (tensor-parallel workers) serialise on a file lock. Returns variant -> path."""
    from filelock import FileLock

    verbose = envs.cpu_build_verbose() if verbose is None else verbose
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(out_dir / ".build.lock"))
        lock.acquire()
    except OSError as exc:
        raise CpuOpBuildError(f"cannot write the MiKV C++ CPU op build directory {out_dir} ({exc}); set "
                              f"{BUILD_DIR_ENV} to a writable directory or {WAY_OUT}") from exc
    try:
        paths = {v.name: out_dir / f"{module_name(v)}.so" for v in todo}
        missing = [v for v in todo if not paths[v.name].is_file()]
        if missing:
            _compile(missing, out_dir / "build", verbose)
            for v in missing:
                os.replace(out_dir / "build" / f"{module_name(v)}.so", paths[v.name])
        return paths
    finally:
        lock.release()


def _jobs() -> int:
    """Parallel compiles: one per CPU, fewer when memory is short (a compile of these sources with
    torch's headers peaks at 1.5-2.3 GiB; ninja's default of CPUs + 2 got compilers OOM-killed)."""
    jobs = os.cpu_count() or 1
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                jobs = min(jobs, int(line.split()[1]) // (2 << 20))   # kB -> 2 GiB units
    except (OSError, ValueError, IndexError):
        pass
    return max(1, jobs)


def _compile(todo: list[Variant], work: Path, verbose: bool) -> None:
    if shutil.which(envs.cxx()) is None:
        raise CpuOpBuildError(f"building the MiKV C++ CPU op needs a C++17 compiler: {envs.cxx()!r} is not on PATH "
                              f"(install g++, or set {envs.CXX}); {WAY_OUT}")
    work.mkdir(parents=True, exist_ok=True)
    (work / "build.ninja").write_text(_ninja_file(todo, work))
    targets = [str(work / f"{module_name(v)}.so") for v in todo]
    cmd = [_ninja_path(), "-C", str(work), "-j", str(_jobs()), *(["-v"] if verbose else []), *targets]
    proc = subprocess.run(cmd, stdout=None if verbose else subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        lines = (proc.stdout or "").splitlines()
        errors = [ln for ln in lines if "error" in ln.lower() or ln.startswith("FAILED") or "Killed" in ln]
        tail = "\n".join(errors[:30] + ["(last lines:)"] + lines[-15:])
        raise CpuOpBuildError(f"building the MiKV C++ CPU op ({', '.join(v.name for v in todo)}) from "
                              f"{', '.join(p.name for p in SOURCES)} in {work} failed (needs a C++17 compiler and "
                              f"ninja; {WAY_OUT}):\n{tail}")


# ------------------------------------------------------------------ loading
def select() -> Variant:
    """The variant to load: ``MIKV_CPU_ISA`` (auto: the best this CPU runs); one the CPU lacks raises."""
    requested, features = envs.cpu_isa(), isa.cpu_features()
    if requested == "auto":
        return isa.runnable(features)[0]
    try:
        variant = isa.by_name(requested)
    except ValueError as exc:
        raise CpuOpBuildError(f"{envs.CPU_ISA}={requested}: {exc}") from None
    lacking = isa.missing(variant, features)
    if lacking:
        runs = ", ".join(v.name for v in isa.runnable(features))
        raise CpuOpBuildError(f"{envs.CPU_ISA}={requested}: this CPU lacks {', '.join(lacking)} "
                              f"(variants it runs: {runs})")
    return variant


def load_variant(variant: Variant, build_missing: bool = True):
    """The module of ``variant`` (imported once per process); built into :func:`build_dir` when no build
    of the current sources exists and ``build_missing``, else :class:`CpuOpBuildError`."""
    name = module_name(variant)
    if name in _MODULES:
        return _MODULES[name]
    path = find(variant)
    if path is None:
        if not build_missing:
            raise CpuOpBuildError(f"no build of the MiKV C++ CPU op {name} in {', '.join(map(str, search_dirs()))}; "
                                  f"run `mikv-vllm build-ops`, or {WAY_OUT}")
        logger.warning("MiKV: no prebuilt C++ CPU op %s (run `mikv-vllm build-ops` at install time); building "
                       "it now in %s (minutes)", name, build_dir())
        t0 = time.monotonic()
        path = build([variant], build_dir())[variant.name]
        logger.warning("MiKV: built the C++ CPU op %s in %.0f s", name, time.monotonic() - t0)
    spec = importlib.util.spec_from_file_location(name, path)
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError as exc:
        raise CpuOpBuildError(f"cannot import the MiKV C++ CPU op {path} ({exc}); delete it and run "
                              f"`mikv-vllm build-ops`, or {WAY_OUT}") from exc
    _MODULES[name] = module
    logger.info("MiKV: C++ CPU op %s variant from %s", variant.name, path)
    return module


def load():
    """The module of the selected variant (:func:`select`), built first if no build exists; thread-safe."""
    global _ACTIVE
    if _ACTIVE is not None:
        return _ACTIVE
    with _LOCK:
        if _ACTIVE is None:
            _ACTIVE = load_variant(select())
    return _ACTIVE


# ------------------------------------------------------------------ install-time command
def _prune(out_dir: Path, keep: set[str]) -> None:
    """Remove builds of other source versions from ``out_dir`` (the package's own directory only)."""
    for old in out_dir.glob("mikv_cpu_*.so"):
        if old.stem not in keep:
            old.unlink()


def cli_main(args: argparse.Namespace) -> int:
    """``mikv-vllm build-ops``: build the op's variants (idempotent: present builds are kept)."""
    if args.isa == ["all"]:
        todo = list(isa.for_machine())
    elif args.isa == ["runnable"]:
        todo = isa.runnable()
    else:
        try:
            todo = [isa.by_name(n) for n in args.isa]
        except ValueError as exc:
            raise CpuOpBuildError(str(exc)) from None
    out_dir = args.dir or PREBUILT_DIR
    t0 = time.monotonic()
    paths = build(todo, out_dir, verbose=args.verbose or None)
    if args.dir is None:
        _prune(out_dir, {module_name(v) for v in isa.for_machine()})
    for name, path in paths.items():
        print(f"build-ops: {name:9s} {path}")
    print(f"build-ops: {len(paths)} variant(s) ready in {time.monotonic() - t0:.0f} s "
          f"({platform.machine()}, {sum(p.stat().st_size for p in paths.values()) >> 20} MiB)")
    return 0
