"""deploy/k8s: every rendered object valid at the pinned Kubernetes version (KServe's against its fields), and
wired as a GPU service should be: probes, drain, non-root, read-only, selectors, HTTP and gRPC ports, an HPA on the
queue depth that prometheus-adapter exposes and the service exports, overlays that patch (one with the gRPC readiness
probe), a v2 KServe predictor and a grpc-v2 one."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from app.config.settings import Settings
from tests.support.dockerfile import runtime_env
from tests.support.kubernetes_schemas import Manifest, render, validate_kserve, validate_kubernetes

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"


@pytest.fixture(scope="module")
def base() -> dict[str, Manifest]:
    return {manifest["kind"]: manifest for manifest in render(K8S / "base")}


@pytest.fixture(scope="module")
def kserve() -> dict[str, Manifest]:
    return {manifest["kind"]: manifest for manifest in render(K8S / "kserve")}


@pytest.fixture(scope="module")
def kserve_grpc() -> dict[str, Manifest]:
    return {manifest["kind"]: manifest for manifest in render(K8S / "kserve-grpc")}


def container(deployment: Manifest) -> dict[str, Any]:
    only: dict[str, Any]
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def settings_of(configmap: Manifest) -> Settings:
    return Settings.model_validate({k.removeprefix("VIT_").lower(): v for k, v in configmap["data"].items()})


@pytest.mark.parametrize("kustomization", ["base", "overlays/example", "overlays/grpc-probe"])
@pytest.mark.slow
def test_every_object_is_valid_at_the_pinned_kubernetes_version(kustomization: str) -> None:
    manifests = render(K8S / kustomization)
    kinds = sorted(manifest["kind"] for manifest in manifests)
    assert kinds == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]
    for manifest in manifests:
        validate_kubernetes(manifest)
    broken = copy.deepcopy(next(m for m in manifests if m["kind"] == "Deployment"))
    container(broken)["readinesProbe"] = container(broken).pop("readinessProbe")  # strict: a typo is caught
    with pytest.raises(jsonschema.ValidationError):
        validate_kubernetes(broken)


def test_the_deployment_runs_on_a_gpu_probes_and_drains(base: dict[str, Manifest]) -> None:
    pod = base["Deployment"]["spec"]["template"]["spec"]
    main = container(base["Deployment"])
    assert main["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert main["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    ports = {port["name"]: port["containerPort"] for port in main["ports"]}
    assert ports == {"http": Settings.model_fields["port"].default, "grpc": Settings.model_fields["grpc_port"].default}
    assert ports == {"http": int(runtime_env()["VIT_PORT"]), "grpc": int(runtime_env()["VIT_GRPC_PORT"])}  # the image's
    pre_stop = main["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = settings_of(base["ConfigMap"]).drain_timeout_s
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + drain
    assert main["envFrom"] == [{"configMapRef": {"name": base["ConfigMap"]["metadata"]["name"]}}]


def test_the_pods_run_as_non_root_on_a_read_only_root_filesystem(base: dict[str, Manifest]) -> None:
    pod = base["Deployment"]["spec"]["template"]["spec"]
    main = container(base["Deployment"])
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] >= 1000
    assert main["securityContext"]["readOnlyRootFilesystem"]
    assert main["securityContext"]["allowPrivilegeEscalation"] is False
    assert main["securityContext"]["capabilities"]["drop"] == ["ALL"]
    (tmp,) = main["volumeMounts"]
    assert tmp["mountPath"] == "/tmp" and {"name": "HOME", "value": "/tmp"} in main["env"]


def test_the_service_budget_and_autoscaler_select_the_deployments_pods(base: dict[str, Manifest]) -> None:
    labels = base["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert base["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert base["Service"]["spec"]["selector"].items() <= labels.items()
    assert base["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    http, grpc = base["Service"]["spec"]["ports"]
    container_ports = {p["name"]: p["containerPort"] for p in container(base["Deployment"])["ports"]}
    assert (http["name"], http["targetPort"], http["port"]) == ("http", "http", container_ports["http"])
    assert (grpc["name"], grpc["targetPort"], grpc["port"]) == ("grpc", "grpc", container_ports["grpc"])
    assert grpc["appProtocol"] == "kubernetes.io/h2c"  # gRPC is HTTP/2 without TLS
    target = base["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", base["Deployment"]["metadata"]["name"])
    assert "replicas" not in base["Deployment"]["spec"]  # the autoscaler owns it


async def test_the_autoscaler_metric_is_served_by_the_adapter_rule_and_exported(
    base: dict[str, Manifest], client: httpx.AsyncClient
) -> None:
    (metric,) = base["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"] == "vit_queue_depth"
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    series = promql_parser.parse(rule["seriesQuery"])
    assert isinstance(series, promql_parser.VectorSelector)
    query = rule["metricsQuery"].replace("<<.Series>>", "vit_queue_depth")
    query = query.replace("<<.LabelMatchers>>", 'namespace="ml",pod=~"vit-serve-.*"').replace("<<.GroupBy>>", "pod")
    promql_parser.parse(query)  # what the adapter sends Prometheus parses
    exported = {family.name for family in text_string_to_metric_families((await client.get("/metrics")).text)}
    assert series.name in exported and series.name == "vit_queue_depth"


@pytest.mark.slow
def test_the_example_overlay_patches_image_namespace_settings_and_scale() -> None:
    manifests = {manifest["kind"]: manifest for manifest in render(K8S / "overlays" / "example")}
    assert {manifest["metadata"]["namespace"] for manifest in manifests.values()} == {"vit-serve"}
    assert container(manifests["Deployment"])["image"] == "registry.example.com/ml/vit-serve:0.1.0"
    assert settings_of(manifests["ConfigMap"]).max_batch_size == 64
    assert manifests["HorizontalPodAutoscaler"]["spec"]["maxReplicas"] == 16


@pytest.mark.slow
def test_the_grpc_probe_overlay_makes_readiness_the_grpc_health_check_on_the_grpc_port(
    base: dict[str, Manifest],
) -> None:
    manifests = {manifest["kind"]: manifest for manifest in render(K8S / "overlays" / "grpc-probe")}
    main, plain = container(manifests["Deployment"]), container(base["Deployment"])
    grpc_port = next(port["containerPort"] for port in main["ports"] if port["name"] == "grpc")
    assert main["readinessProbe"]["grpc"] == {"port": grpc_port}  # no service name: the server's overall health
    assert {k: v for k, v in main["readinessProbe"].items() if k != "grpc"} == {
        k: v for k, v in plain["readinessProbe"].items() if k != "httpGet"
    }
    assert main["startupProbe"] == plain["startupProbe"] and main["livenessProbe"] == plain["livenessProbe"]
    others = [kind for kind in base if kind != "Deployment"]
    assert [manifests[kind] for kind in others] == [base[kind] for kind in others]  # only the probe changes


def test_kserve_runs_the_container_as_a_v2_predictor(kserve: dict[str, Manifest]) -> None:
    for manifest in kserve.values():
        validate_kserve(manifest)
    runtime, service = kserve["ServingRuntime"], kserve["InferenceService"]
    model = service["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "v2" and model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in [f["name"] for f in runtime["spec"]["supportedModelFormats"]]
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"
    (server,) = runtime["spec"]["containers"]
    env = {e["name"]: e["value"] for e in server["env"]}
    assert server["name"] == "kserve-container" and server["image"] == "vit-serve:0.1.0"
    assert [p["containerPort"] for p in server["ports"]] == [int(env["VIT_PORT"])]
    assert env["VIT_GRPC_PORT"] == "0"  # KServe routes one port: gRPC is the grpc-v2 variant's
    assert server["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": int(env["VIT_PORT"])}
    assert server["securityContext"]["runAsNonRoot"] and server["securityContext"]["readOnlyRootFilesystem"]
    broken = copy.deepcopy(service)
    broken["spec"]["predictor"]["model"]["protocolVersion"] = "v3"
    with pytest.raises(jsonschema.ValidationError):
        validate_kserve(broken)


def test_kserve_grpc_variant_serves_grpc_on_the_port_knative_routes(
    kserve: dict[str, Manifest], kserve_grpc: dict[str, Manifest]
) -> None:
    for manifest in kserve_grpc.values():
        validate_kserve(manifest)
    runtime, service = kserve_grpc["ServingRuntime"], kserve_grpc["InferenceService"]
    model = service["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "grpc-v2" and runtime["spec"]["protocolVersions"] == ["grpc-v2"]
    assert model["runtime"] == runtime["metadata"]["name"] != kserve["ServingRuntime"]["metadata"]["name"]
    assert service["metadata"]["name"] != kserve["InferenceService"]["metadata"]["name"]  # both fit in one namespace
    assert model["modelFormat"]["name"] in [f["name"] for f in runtime["spec"]["supportedModelFormats"]]
    (server,) = runtime["spec"]["containers"]
    env = {e["name"]: e["value"] for e in server["env"]}
    assert server["name"] == "kserve-container" and server["image"] == "vit-serve:0.1.0"
    (port,) = server["ports"]  # Knative: one port per container; h2c, the name it routes HTTP/2 without TLS to
    assert (port["name"], port["containerPort"]) == ("h2c", int(env["VIT_GRPC_PORT"]))
    assert int(env["VIT_PORT"]) != port["containerPort"]
    assert server["readinessProbe"]["grpc"] == {"port": port["containerPort"]}
    assert server["securityContext"]["runAsNonRoot"] and server["securityContext"]["readOnlyRootFilesystem"]
    Settings.model_validate({k.removeprefix("VIT_").lower(): v for k, v in env.items() if k.startswith("VIT_")})
