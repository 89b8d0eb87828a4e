"""docker-compose.yml: valid against the Compose Specification's JSON schema, and wired as the README says (GPU,
health check, models volume, settings file, nginx for --scale over HTTP and gRPC, a monitoring profile that scrapes
and shows)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from app.config.settings import Settings
from tests.support.dockerfile import healthcheck_command, runtime_env

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
SCHEMA = Path(__file__).resolve().parents[1] / "data" / "compose-spec.json"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


def schema_errors(document: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def seconds(duration: str) -> float:
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert parts and duration, duration
    return int(parts[1] or 0) * 60 + int(parts[2] or 0)


def env_file(compose: dict[str, Any]) -> dict[str, str]:
    (entry,) = compose["services"]["vit-serve"]["env_file"]
    lines = (REPO / entry["path"]).read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def test_the_compose_file_is_valid_against_the_compose_specification(compose: dict[str, Any]) -> None:
    jsonschema.Draft7Validator.check_schema(json.loads(SCHEMA.read_text()))
    assert schema_errors(compose) == []
    broken = copy.deepcopy(compose)  # the schema is not vacuous: it catches a misspelt key
    broken["services"]["vit-serve"]["healthchek"] = broken["services"]["vit-serve"].pop("healthcheck")
    assert schema_errors(broken)


def test_the_service_reserves_a_gpu_checks_health_and_drains(compose: dict[str, Any]) -> None:
    service = compose["services"]["vit-serve"]
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == 1
    assert service["healthcheck"]["test"] == ["CMD", *healthcheck_command()]  # the image's own check
    assert service["stop_signal"] == "SIGTERM"
    drain = float(env_file(compose).get("VIT_DRAIN_TIMEOUT_S", Settings.model_fields["drain_timeout_s"].default))
    assert seconds(service["stop_grace_period"]) > drain
    assert "./models:/opt/vit-serve/models:ro" in service["volumes"]
    assert "ports" not in service  # replicas are reached through nginx, so --scale works


def test_the_settings_file_names_only_real_settings(compose: dict[str, Any]) -> None:
    settings = env_file(compose)
    assert settings
    for name in settings:
        assert name.startswith("VIT_") and name.removeprefix("VIT_").lower() in Settings.model_fields, name
    Settings.model_validate({k.removeprefix("VIT_").lower(): v for k, v in settings.items()})


def test_nginx_balances_over_the_replicas_with_the_shipped_config(compose: dict[str, Any]) -> None:
    nginx = compose["services"]["nginx"]
    http, grpc = runtime_env()["VIT_PORT"], runtime_env()["VIT_GRPC_PORT"]
    assert nginx["ports"] == [f"{http}:{http}", f"{grpc}:{grpc}"]
    assert compose["services"]["vit-serve"]["expose"] == [http, grpc]
    assert nginx["depends_on"]["vit-serve"]["condition"] == "service_healthy"
    mounts = dict(volume.rsplit(":", 1)[0].split(":", 1) for volume in nginx["volumes"])
    assert mounts == {
        "./deploy/nginx/nginx.conf": "/etc/nginx/nginx.conf",
        "./deploy/nginx/vit-serve-proxy.conf": "/etc/nginx/vit-serve-proxy.conf",
        "./deploy/nginx/vit-serve-grpc-proxy.conf": "/etc/nginx/vit-serve-grpc-proxy.conf",
    }
    conf = (REPO / "deploy" / "nginx" / "nginx.conf").read_text()
    assert "include vit-serve-proxy.conf;" in conf and f"server vit-serve:{http} resolve" in conf
    # gRPC: HTTP/2 on the published port, calls passed to each replica's gRPC port
    grpc_server = re.search(rf"server \{{\s*listen {grpc};\s*http2 on;.*?\}}", conf, re.DOTALL)
    assert grpc_server and "include vit-serve-grpc-proxy.conf;" in grpc_server.group(0)
    assert f"server vit-serve:{grpc} resolve" in conf
    rules = (REPO / "deploy" / "nginx" / "vit-serve-grpc-proxy.conf").read_text()
    assert "grpc_pass grpc://vit_serve_grpc;" in rules and "upstream vit_serve_grpc {" in conf


def test_every_bind_mount_exists_in_the_repository(compose: dict[str, Any]) -> None:
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), source


def test_the_monitoring_profile_scrapes_every_replica_and_provisions_the_dashboard(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["prometheus"]["profiles"] == services["grafana"]["profiles"] == ["monitoring"]
    scrape = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = scrape["scrape_configs"]
    (discovery,) = job["dns_sd_configs"]
    assert (discovery["names"], discovery["port"]) == (["vit-serve"], 8000)
    provisioning = REPO / "deploy" / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090" and source["isDefault"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "vit-serve.yml").read_text())["providers"]
    mounted = [v.split(":")[1] for v in services["grafana"]["volumes"] if "vit-serve-dashboard.json" in v]
    assert [str(Path(target).parent) for target in mounted] == [provider["options"]["path"]]
