"""The client as its own distribution: `pip install ./clients/python` in a fresh virtual environment brings httpx,
numpy, Pillow and tqdm but no torch, and its `vit-serve predict` classifies photographs through a real server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.photos import jpeg, photo
from tests.support.processes import tiny_server_process

REPO = Path(__file__).resolve().parents[2]
PHOTOS = ("chelsea", "astronaut", "coffee", "rocket", "camera")
SERVER_ONLY = {"torch", "torchvision", "fastapi", "uvicorn", "pydantic", "vit-serve"}


@pytest.mark.slow
# A fresh environment, and pip resolving the four dependencies from its index: about a minute here, more on a cold
# cache; the server's start and the run are seconds.
@pytest.mark.timeout(600)
def test_the_client_installs_without_torch_and_predicts(tmp_path: Path) -> None:
    # A copy, so that the build's own files (build/, *.egg-info) stay out of the repository.
    source = shutil.copytree(
        REPO / "clients" / "python",
        tmp_path / "python",
        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"),
    )
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120, env=env)
    python, vit_serve = venv / "bin" / "python", venv / "bin" / "vit-serve"

    def run(*command: str | Path, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(c) for c in command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout_s
        )

    install = run(python, "-m", "pip", "install", "--quiet", source, timeout_s=540)
    assert install.returncode == 0, install.stdout + install.stderr
    installed = {p["name"].lower() for p in json.loads(run(python, "-m", "pip", "list", "--format=json").stdout)}
    assert {"vit-serve-client", "httpx", "numpy", "pillow", "tqdm"} <= installed
    assert not installed & SERVER_ONLY
    no_torch = run(python, "-c", "import torch")
    assert no_torch.returncode == 1 and "No module named 'torch'" in no_torch.stderr
    where = run(python, "-c", "import vit_serve_client; print(vit_serve_client.__file__)").stdout
    assert where.startswith(str(venv))  # the installed copy, not this repository's

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in PHOTOS:
        (folder / f"{name}.jpg").write_bytes(jpeg(photo(name)))
    with tiny_server_process(tmp_path / "server") as url:
        result = run(vit_serve, "predict", folder, "--url", url, "--no-progress", "--top-k", "3")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(line["path"] for line in lines) == sorted(str(folder / f"{name}.jpg") for name in PHOTOS)
    assert all(line["error"] is None and len(line["top_k"]) == 3 for line in lines)
    assert result.stderr.splitlines()[-1].startswith("5 images: 5 classified, 0 failed")

    serve = run(vit_serve, "serve")
    assert serve.returncode == 2 and "pip install vit-serve" in serve.stderr
