"""The benchmark report: ratios against the baseline and the offline limit, from a run's record."""

from __future__ import annotations

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
