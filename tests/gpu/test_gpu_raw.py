"""bench/gpu_raw.py's logic on the CPU with the tiny model: cells, skips, the budget and the numerical check."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from bench import gpu_raw


def run(tmp_path: Path, *extra: str) -> dict[str, Any]:
    argv = ["--device", "cpu", "--model", "tiny", "--no-compile", "--batch-sizes", "1,2", "--target-cell-s", "0.05"]
    assert gpu_raw.main([*argv, "--out", str(tmp_path), *extra]) == 0
    result: dict[str, Any] = json.loads((tmp_path / "gpu_raw.json").read_text())
    return result


@pytest.mark.slow
def test_cpu_matrix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run(tmp_path, "--budget-s", "60")
    assert result["benchmark"] == "gpu_raw"
    assert result["device"]["type"] == "cpu"
    assert result["torch"] and result["date"]
    cells = {(c["dtype"], c["mode"], c["batch_size"]): c for c in result["cells"]}
    assert set(cells) == {(d, m, bs) for d in ("fp32", "fp16", "bf16") for m in gpu_raw.MODES for bs in (1, 2)}
    # The priority order: fp16 eager first, the compiled groups last.
    order = list(dict.fromkeys((c["dtype"], c["mode"]) for c in result["cells"]))
    assert order == list(gpu_raw.PRIORITY)

    for dtype in ("fp32", "fp16", "bf16"):
        for bs in (1, 2):
            eager = cells[(dtype, "eager", bs)]
            assert eager["status"] == "ok", eager
            assert eager["images_per_s"] > 0
            assert eager["ms_per_batch"] > 0
            assert eager["images_per_s"] == pytest.approx(bs / (eager["ms_per_batch"] / 1000))
            assert len(eager["repeat_ms"]) == eager["repeats"] >= gpu_raw.MIN_REPEATS
            graphs = cells[(dtype, "graphs", bs)]
            assert graphs["status"] == "skipped"
            assert graphs["reason"] == "needs CUDA"
            assert graphs["images_per_s"] is None
            compiled = cells[(dtype, "compiled", bs)]
            assert compiled["status"] == "skipped"
            assert "no-compile" in compiled["reason"]

    checks = {(c["dtype"], c["mode"]): c for c in result["checks"]}
    fp32 = checks[("fp32", "eager")]
    assert fp32["status"] == "ok"
    assert fp32["max_rel_err"] == 0.0
    assert fp32["top1_agreement"] == 1.0
    bf16 = checks[("bf16", "eager")]
    assert bf16["status"] == "ok"
    assert bf16["all_finite"] is True
    assert bf16["max_rel_err"] is not None and math.isfinite(bf16["max_rel_err"])
    assert 0.0 <= bf16["top1_agreement"] <= 1.0
    assert checks[("fp16", "graphs")]["reason"] == "needs CUDA"

    table = capsys.readouterr().out
    assert "fp16/eager" in table and "bs2" in table and "needs CUDA" in table


@pytest.mark.slow
def test_budget_skips_cells(tmp_path: Path) -> None:
    result = run(tmp_path, "--budget-s", "0", "--modes", "eager")
    assert result["cells"]
    for cell in result["cells"]:
        assert cell["status"] == "skipped"
        assert cell["reason"] == "budget"
    assert all(check["reason"] == "budget" for check in result["checks"])
