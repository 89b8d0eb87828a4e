"""The fast tier stays fast: its tests of pure-Python stages import neither torch nor the HTTP stack."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TORCH_FREE = [
    "tests.unit.test_batcher",
    "tests.unit.test_bench_report",
    "tests.unit.test_cli",
    "tests.unit.test_decode_pool",
    "tests.unit.test_decode_properties",
    "tests.unit.test_image_scan",
    "tests.unit.test_loadgen",
]


@pytest.mark.slow
def test_the_pure_stages_tests_import_no_torch_and_no_http_stack() -> None:
    # A fresh interpreter: this one has imported whatever other tests needed.
    code = (
        "import importlib, sys\n"
        f"for name in {TORCH_FREE!r}: importlib.import_module(name)\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'fastapi', 'uvicorn') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
