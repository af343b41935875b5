"""Offline validation of deploy/k8s: the Kubernetes manifests.

No cluster: manifests go through kubernetes-validate (strict JSON schemas of the
Kubernetes API, versions 1.28 and latest), the ServiceMonitor (a CRD
kubernetes-validate has no schema for) through a schema of our own
(tests/data/servicemonitor-schema.json) plus kubernetes-validate's
ObjectMeta/LabelSelector schemas, and the Deployments' command lines through
vLLM's real `vllm serve` parser with the MiKV plugin registered (no engine is
started). Dockerfiles, ignore files and helper scripts: test_deploy_images.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from deploy_helpers import (CUDA_DEFAULT_MODEL, K8S, ROOT, expected_additional, k8s_docs, k8s_one,
                            serve_engine_args)

CORE_MANIFESTS = ["configmap.yaml", "deployment.yaml", "service.yaml"]
CRD_MANIFESTS = ["servicemonitor.yaml"]
# drop-in replacements for a core manifest (apply one or the other): not in the kustomization
VARIANT_MANIFESTS = {"deployment-tp.yaml": "deployment.yaml"}
K8S_VERSIONS = ["1.28.0", None]  # None: kubernetes-validate's latest
DEPLOYMENTS = {"deployment.yaml": CUDA_DEFAULT_MODEL, "deployment-tp.yaml": "Qwen/Qwen2.5-72B-Instruct"}
LABELS = {"app.kubernetes.io/name": "mikv-vllm", "app.kubernetes.io/component": "server"}
SERVICE_MONITOR_SCHEMA = json.loads((Path(__file__).parent / "data" / "servicemonitor-schema.json").read_text())


def test_every_manifest_is_classified():
    files = {p.name for p in K8S.glob("*.yaml")}
    assert files == set(CORE_MANIFESTS) | set(CRD_MANIFESTS) | set(VARIANT_MANIFESTS) | {"kustomization.yaml"}


@pytest.mark.parametrize("version", K8S_VERSIONS, ids=lambda v: v or "latest")
@pytest.mark.parametrize("name", CORE_MANIFESTS + list(VARIANT_MANIFESTS))
def test_core_manifest_kubernetes_validate_strict(name, version):
    import kubernetes_validate

    version = version or kubernetes_validate.latest_version()
    docs = k8s_docs(name)
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

def _duration_s(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)(ms|s|m|h|d|w|y)", text))


def test_servicemonitor_crd():
    import jsonschema
    import kubernetes_validate

    doc = k8s_one("servicemonitor.yaml")
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
    deployment, service, configmap = k8s_one(name), k8s_one("service.yaml"), k8s_one("configmap.yaml")
    monitor = k8s_one("servicemonitor.yaml")
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

    base, tp = k8s_one("deployment.yaml"), k8s_one("deployment-tp.yaml")
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
    kustomization = k8s_one("kustomization.yaml")
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    # the CRD stays out of the base so `kubectl apply -k` works without the Prometheus Operator
    assert kustomization["resources"] == CORE_MANIFESTS


def _configmap_file(tmp_path: Path, name: str = "deployment.yaml") -> tuple[Path, list[str]]:
    """The Deployment's command with --config pointing at the ConfigMap's file, written locally."""
    (container,) = k8s_one(name)["spec"]["template"]["spec"]["containers"]
    data = k8s_one("configmap.yaml")["data"]
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
