"""The metrics reference: every metric family the service's registry exports, with its type, labels and help."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ref_service
from ref_text import cell, code, table

SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}


@dataclass(frozen=True)
class Family:
    name: str
    type: str
    labels: tuple[str, ...]
    help: str

    @property
    def exported(self) -> list[str]:
        """The sample names a scrape shows (a counter's `_total`, a histogram's three series)."""
        return [self.name + suffix for suffix in SUFFIXES.get(self.type, ("",))]


def families() -> list[Family]:
    """What the registry of a one-process service exports, plus the CUDA memory gauges (exported only on a GPU)."""
    from app.observability.worker_metrics import CUDA_MEMORY

    metrics = ref_service.app().state.metrics
    declared = _declared_labels(metrics)
    found: dict[str, Family] = {}
    for family in metrics.registry.collect():
        sampled = {key for sample in family.samples for key in sample.labels if key != "le"}
        labels = declared.get(family.name) or tuple(sorted(sampled))
        found[family.name] = Family(family.name, family.type, labels, family.documentation)
    for name, (documentation, _) in CUDA_MEMORY.items():
        found.setdefault(name, Family(name, "gauge", ("device",), f"{documentation} On CUDA only."))
    return sorted(found.values(), key=lambda f: (not f.name.startswith("vit_"), f.name))


def _declared_labels(metrics: Any) -> dict[str, tuple[str, ...]]:
    """Label names of the metrics that have no series yet (no request has been answered): from their declaration."""
    from prometheus_client.metrics import MetricWrapperBase

    return {
        metric._name: tuple(metric._labelnames)
        for metric in vars(metrics).values()
        if isinstance(metric, MetricWrapperBase)
    }


def markdown() -> str:
    rows = [
        [
            "<br>".join(code(name) for name in family.exported),
            family.type,
            ", ".join(code(label) for label in family.labels) or "",
            cell(family.help),
        ]
        for family in families()
    ]
    return table(["metric", "type", "labels", "what"], rows)
