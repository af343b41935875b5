"""Shared by the deploy/ tests (test_deploy_k8s.py, test_deploy_images.py): paths, the manifests and
Dockerfiles read as data, and vLLM's real `vllm serve` parser with the MiKV plugin registered."""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILES = {"cpu": DEPLOY / "Dockerfile.cpu", "cuda": DEPLOY / "Dockerfile.cuda"}
STAND_IN_MODEL = str(K8S)
CUDA_DEFAULT_MODEL = "Qwen/Qwen2.5-7B-Instruct"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_deploy_{name}", DEPLOY / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def k8s_docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d is not None]


def k8s_one(name: str) -> dict:
    (doc,) = k8s_docs(name)
    return doc


# --------------------------------------------------------------- vLLM parser
@functools.lru_cache(maxsize=1)
def _serve_parser():
    import mikv_vllm.plugin

    mikv_vllm.plugin.register()
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(description="vLLM CLI")  # as vllm.entrypoints.cli.main
    subparsers = parser.add_subparsers(required=False, dest="subparser")
    cmd = ServeSubcommand()
    cmd.subparser_init(subparsers).set_defaults(dispatch_function=cmd.cmd)
    return parser, cmd


def serve_engine_args(argv: list[str]):
    """EngineArgs for the process command line ``argv`` (``["vllm", "serve", MODEL, ...]``).

    MODEL is replaced by an existing directory: with HF_HUB_OFFLINE=1 (set by
    tests/conftest.py) EngineArgs would resolve a hub id through the local HF
    cache. The callers check the model argument themselves.
    """
    from vllm.engine.arg_utils import AsyncEngineArgs

    assert argv[:2] == ["vllm", "serve"] and not argv[2].startswith("-"), argv
    parser, cmd = _serve_parser()
    args = parser.parse_args(["serve", STAND_IN_MODEL, *argv[3:]])
    cmd.validate(args)
    if getattr(args, "model_tag", None) is not None:
        args.model = args.model_tag
    engine_args = AsyncEngineArgs.from_cli_args(args)
    assert engine_args.model == STAND_IN_MODEL
    return engine_args


def expected_additional(policy: str, preset_name: str) -> dict:
    from mikv_vllm.config import preset

    return {"kv_cache_policy": policy, "mikv": preset(preset_name).to_dict()}


# ---------------------------------------------------------------- Dockerfile
def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        if buf:
            word, _, rest = buf.partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def exec_form(path: Path, instruction: str) -> list[str]:
    """The JSON array of the last ``instruction`` (CMD / ENTRYPOINT); fails on shell form."""
    found = [rest for word, rest in dockerfile_instructions(path) if word == instruction]
    assert found, f"{path.name} has no {instruction}"
    value = json.loads(found[-1])
    assert isinstance(value, list) and all(isinstance(x, str) for x in value), f"{instruction} must be exec form"
    return value


def image_command(path: Path, run_args: list[str] | None = None) -> list[str]:
    """What `docker run IMAGE [run_args]` executes: ENTRYPOINT + (run_args or CMD)."""
    return exec_form(path, "ENTRYPOINT") + (run_args if run_args is not None else exec_form(path, "CMD"))


def dockerfile_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in dockerfile_instructions(path):
        if word == "ENV":
            for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', rest):
                env[key] = value.strip('"')
    return env


def tool(name: str) -> str:
    exe = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail(f"{name} not found: pip install -e '.[test]' (it is in the test extra)")
    return exe
