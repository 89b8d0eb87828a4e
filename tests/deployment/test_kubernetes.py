"""deploy/k8s: every rendered object valid at the pinned Kubernetes version (KServe's against its fields), and
wired as a GPU service should be: probes, drain, non-root, read-only, selectors, an HPA on the queue depth that
prometheus-adapter exposes and the service exports, an overlay that patches, a v2 KServe predictor."""

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
from tests.support.kubernetes_schemas import Manifest, render, validate_kserve, validate_kubernetes

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"


@pytest.fixture(scope="module")
def base() -> dict[str, Manifest]:
    return {manifest["kind"]: manifest for manifest in render(K8S / "base")}


@pytest.fixture(scope="module")
def kserve() -> dict[str, Manifest]:
    return {manifest["kind"]: manifest for manifest in render(K8S / "kserve")}


def container(deployment: Manifest) -> dict[str, Any]:
    only: dict[str, Any]
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def settings_of(configmap: Manifest) -> Settings:
    return Settings.model_validate({k.removeprefix("VIT_").lower(): v for k, v in configmap["data"].items()})


@pytest.mark.parametrize("kustomization", ["base", "overlays/example"])
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
    assert [port["containerPort"] for port in main["ports"]] == [Settings.model_fields["port"].default]
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
    (port,) = base["Service"]["spec"]["ports"]
    assert port["targetPort"] in [p["name"] for p in container(base["Deployment"])["ports"]]
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
    assert server["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": int(env["VIT_PORT"])}
    assert server["securityContext"]["runAsNonRoot"] and server["securityContext"]["readOnlyRootFilesystem"]
    broken = copy.deepcopy(service)
    broken["spec"]["predictor"]["model"]["protocolVersion"] = "v3"
    with pytest.raises(jsonschema.ValidationError):
        validate_kserve(broken)
