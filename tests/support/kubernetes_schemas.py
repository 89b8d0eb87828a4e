"""Kubernetes manifests rendered by kustomize and checked against schemas: Kubernetes' own (kubernetes-validate,
at one pinned version) and KServe's, assembled the way KServe's CRDs are (Kubernetes' PodSpec and Container with
KServe's fields added; tests/data/kserve-fields.json)."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate.utils import schema_contents

KUBERNETES_VERSION = "1.33.0"  # the version every manifest is checked against
KSERVE_FIELDS = Path(__file__).resolve().parents[1] / "data" / "kserve-fields.json"

Manifest = dict[str, Any]


def render(kustomization: Path) -> list[Manifest]:
    """What `kubectl apply -k` would send: kustomize's output, one dict per object."""
    kubectl = Path(sys.executable).parent / "kubectl"
    result = subprocess.run([kubectl, "kustomize", str(kustomization)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def validate_kubernetes(manifest: Manifest) -> None:
    """Raises if `manifest` is not a valid object of a built-in kind (strict: unknown fields are errors)."""
    kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def validate_kserve(manifest: Manifest) -> None:
    """Raises if an InferenceService or ServingRuntime does not fit its schema."""
    jsonschema.Draft202012Validator(_kserve_schema(manifest["kind"])).validate(manifest)


@cache
def _definitions() -> dict[str, Any]:
    definitions: dict[str, Any] = schema_contents(
        f"kubernetes-json-schema/v{KUBERNETES_VERSION}-local-strict/_definitions.json", KUBERNETES_VERSION
    )
    return definitions


def _object(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required or [], "additionalProperties": False}


def _kubernetes(name: str) -> dict[str, Any]:
    properties: dict[str, Any] = _definitions()["$defs"][f"io.k8s.api.core.v1.{name}"]["properties"]
    return properties


def _kserve_schema(kind: str) -> dict[str, Any]:
    fields = json.loads(KSERVE_FIELDS.read_text())
    if kind == "InferenceService":
        model = _object({**_kubernetes("Container"), **fields["model"]}, ["modelFormat"])
        predictor = _object({**_kubernetes("PodSpec"), **fields["predictor"], "model": model})
        spec = _object({"predictor": predictor, "transformer": {"type": "object"}, "explainer": {"type": "object"}})
        api_version, spec_required = "serving.kserve.io/v1beta1", ["predictor"]
    elif kind == "ServingRuntime":
        pod = {name: _kubernetes("PodSpec")[name] for name in fields["servingRuntimePodSpecFields"]}
        spec = _object({**pod, **fields["servingRuntime"]}, ["containers"])
        api_version, spec_required = "serving.kserve.io/v1alpha1", ["containers"]
    else:
        raise AssertionError(f"no KServe schema for {kind}")
    spec["required"] = spec_required
    return {
        "$defs": _definitions()["$defs"],  # what Kubernetes' "#/$defs/..." references name
        **_object(
            {
                "apiVersion": {"const": api_version},
                "kind": {"const": kind},
                "metadata": {"$ref": "#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"},
                "spec": spec,
            },
            ["apiVersion", "kind", "metadata", "spec"],
        ),
    }
