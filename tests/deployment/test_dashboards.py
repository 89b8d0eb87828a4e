"""The Grafana dashboard, the Prometheus scrape config and the docs' PromQL: valid, and about metrics that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import promql_parser
import pytest
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families

from app.observability.metrics import CudaMemoryCollector
from app.observability.worker_metrics import CUDA_MEMORY

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "vit-serve-dashboard.json"
SCRAPE_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
METRIC = re.compile(r"\b((?:vit|process)_[a-z_]+)")
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$model": ".*"}


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def docs_promql() -> list[str]:
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    blocks = [b for page in pages for b in re.findall(r"```promql\n(.*?)```", page.read_text(), flags=re.DOTALL)]
    return [line for block in blocks for line in block.splitlines() if line.strip() and not line.startswith("#")]


def base_name(sample: str) -> str:
    return re.sub(r"_(bucket|sum|count|total)$", "", sample)


@pytest.fixture
async def exported_names(client: httpx.AsyncClient) -> set[str]:
    """Every metric family the service exports here (CPU), plus the CUDA ones it exports on a GPU."""
    await client.post("/v1/classify", content=b"x", headers={"Content-Type": "image/png"})
    text = (await client.get("/metrics")).text
    names = {family.name for family in text_string_to_metric_families(text)}
    return names | set(CUDA_MEMORY)


@pytest.mark.parametrize("source", ["dashboard", "docs"])
async def test_every_query_parses_and_names_only_exported_metrics(source: str, exported_names: set[str]) -> None:
    exprs = dashboard_exprs() if source == "dashboard" else docs_promql()
    assert len(exprs) >= 8
    for expr in exprs:
        concrete = expr
        for variable, value in GRAFANA_VARIABLES.items():
            concrete = concrete.replace(variable, value)
        promql_parser.parse(concrete)  # raises on a syntax error
        for name in METRIC.findall(concrete):
            assert base_name(name) in exported_names or name in exported_names, f"{name} in {expr}"


def test_the_dashboard_covers_what_operators_ask_for() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = " ".join(dashboard_exprs())
    for needed in (
        "vit_requests_total",
        "histogram_quantile(0.99, sum by (le) (rate(vit_request_duration_seconds_bucket",
        "histogram_quantile(0.5,",
        "histogram_quantile(0.95,",
        "vit_batch_size_bucket",
        "vit_queue_depth",
        "vit_rejected_total",
        "vit_cuda_memory_allocated_bytes",
    ):
        assert needed in exprs, needed
    assert {panel["type"] for panel in dashboard["panels"]} >= {"timeseries", "heatmap"}
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource", "model"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_the_scrape_config_scrapes_the_service_metrics_path() -> None:
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["dns_sd_configs"][0]["names"] == ["vit-serve"] and job["dns_sd_configs"][0]["port"] == 8000


def test_cuda_memory_is_exported_per_device_where_there_is_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert list(CudaMemoryCollector().collect()) == []  # no GPU here: no series
    # The GPU path, with torch's CUDA memory calls standing in for a two-GPU host.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    readings = {"allocated": 100, "reserved": 200, "peak": 150}
    monkeypatch.setitem(
        CUDA_MEMORY,
        "vit_cuda_memory_allocated_bytes",
        ("allocated", lambda i: readings["allocated"] * (i + 1)),
    )
    monkeypatch.setitem(CUDA_MEMORY, "vit_cuda_memory_reserved_bytes", ("reserved", lambda i: readings["reserved"]))
    monkeypatch.setitem(CUDA_MEMORY, "vit_cuda_memory_peak_allocated_bytes", ("peak", lambda i: readings["peak"]))
    families = {f.name: {s.labels["device"]: s.value for s in f.samples} for f in CudaMemoryCollector().collect()}
    assert families["vit_cuda_memory_allocated_bytes"] == {"cuda:0": 100, "cuda:1": 200}
    assert families["vit_cuda_memory_reserved_bytes"] == {"cuda:0": 200, "cuda:1": 200}
    assert families["vit_cuda_memory_peak_allocated_bytes"] == {"cuda:0": 150, "cuda:1": 150}
