"""The benchmark report: ratios against the baseline and the offline limit, from a run's record."""

from __future__ import annotations

import pytest

from bench.report import markdown


def cell(server: str, rps: float, errors: int = 0) -> dict[str, object]:
    return {
        "server": server,
        "model": "tiny",
        "workload": "small",
        "concurrency": 16,
        "rps": rps,
        "p50_ms": 50.0,
        "p99_ms": 90.0,
        "errors": errors,
        "idle_ms": 6.0,
    }


def test_the_report_gives_each_cell_its_ratios_and_shows_errors() -> None:
    record = {
        "started": "2026-11-27T04:40:00+00:00",
        "machine": {"cpu": "AMD EPYC", "cores": "2", "python": "3.11.7", "torch": "2.14.1", "wrk": "wrk 4.1.0"},
        "limits": [
            {
                "model": "tiny",
                "workload": "small",
                "b16_img_s": 230.0,
                "b16_2thread_img_s": 400.0,
                "b1_img_s": 170.0,
                "b1_p50_ms": 5.7,
            }
        ],
        "cells": [cell("vit-serve", 300.0), cell("naive", 200.0, errors=3)],
    }
    text = markdown(record, quick=False)
    assert "| tiny | small | 230.0 | 400.0 | 170.0 | 5.7 |" in text
    assert "| tiny | small | 16 | 300.0 / 50.0 / 90.0 | 200.0 / 50.0 / 90.0 (3 errors) | 1.50 | 0.75 |" in text
    assert "quick" not in text.splitlines()[0]
    assert "quick smoke run" in markdown(record, quick=True).splitlines()[0]


def test_a_cell_without_a_baseline_or_with_a_zero_baseline_has_no_ratio() -> None:
    record = {
        "started": "x",
        "machine": {"cpu": "c", "cores": "2", "python": "3", "torch": "2", "wrk": "w"},
        "limits": [],
        "cells": [cell("vit-serve", 3.0), cell("naive", 0.0)],
    }
    assert "| tiny | small | 16 | 3.0 / 50.0 / 90.0 | 0.0 / 50.0 / 90.0 | - | - |" in markdown(record, quick=False)


def backends_record(img_s: dict[str, float], limits: dict[str, float], top1: float) -> dict[str, object]:
    """A bench/backends.py record: M-base W-small c=16 on each backend, each one's offline limit, int8's gate."""

    def limit(backend: str, value: float) -> dict[str, object]:
        return {"model": "base", "workload": "small", "backend": backend, "b16_img_s": value, "b16_2thread_img_s": 1.0}

    def served(backend: str, value: float) -> dict[str, object]:
        cell = {"model": "base", "workload": "small", "backend": backend, "concurrency": 16, "img_s": value}
        gate = {"top1_agreement": top1} if backend.endswith("int8") else None
        return {"model": "base", "backend": backend, "cells": [cell], "accuracy_gate": gate}

    return {
        "variants": {name: [] for name in img_s},
        "limits": [limit(b, v) for b, v in limits.items()],
        "services": [served(b, v) for b, v in img_s.items()],
    }


@pytest.mark.slow  # importing bench.backends loads torchvision, whose CUDA lookup runs ldconfig
def test_the_backends_goals_compare_the_best_of_each_precision_with_torch_and_with_its_own_limit() -> None:
    from bench.backends import goals

    record = backends_record(
        {"torch": 10.0, "onnxruntime": 12.0, "openvino": 16.0, "openvino-int8": 24.0},
        {"torch": 11.0, "onnxruntime": 13.0, "openvino": 16.5, "openvino-int8": 30.0},
        top1=1.0,
    )
    rows = {(g["goal"], g["backend"]): (g["value"], g["met"]) for g in goals(record)}
    assert rows == {
        ("best float backend >= 1.5x torch", "openvino"): (1.6, True),
        ("best int8 >= 2.5x torch", "openvino-int8"): (2.4, False),
        ("int8 top-1 agreement >= 0.99 (photographs)", "openvino-int8"): (1.0, True),
        ("service >= 0.95x its offline limit", "openvino"): (16.0 / 16.5, True),
        ("service >= 0.95x its offline limit", "openvino-int8"): (0.8, False),
    }


@pytest.mark.slow  # importing bench.backends loads torchvision, whose CUDA lookup runs ldconfig
def test_a_backends_goal_not_measured_is_missed_not_met() -> None:
    from bench.backends import goals

    rows = goals(backends_record({"torch": 10.0}, {"torch": 11.0}, top1=1.0))
    assert [(g["backend"], g["value"], g["met"]) for g in rows] == [(None, None, False)] * 5
