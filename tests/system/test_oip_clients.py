"""Real OIP clients against a real server process: NVIDIA's tritonclient and perf_analyzer."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from skimage import data as skdata

from tests.support.processes import tiny_server_process

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def photographs() -> list[bytes]:
    """Real JPEGs: scikit-image's photographs."""
    import io

    out = []
    for array in (skdata.chelsea(), skdata.astronaut(), skdata.coffee()):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with tiny_server_process(tmp_path_factory.mktemp("repo")) as url:
        yield url


def test_tritonclient_health_metadata_config_and_inference(server: str) -> None:
    client = triton.InferenceServerClient(server.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
    assert client.get_model_metadata("tiny")["inputs"][0]["name"] == "IMAGE"
    assert client.get_model_config("tiny")["max_batch_size"] == 64
    images = photographs()
    image_input = triton.InferInput("IMAGE", [len(images), 1], "BYTES")
    image_input.set_data_from_numpy(np.array(images, dtype=object).reshape(-1, 1), binary_data=True)
    tensor = client.infer("tiny", [image_input], outputs=[triton.InferRequestedOutput("LOGITS", binary_data=True)])
    ranked = client.infer(
        "tiny", [image_input], outputs=[triton.InferRequestedOutput("LOGITS", binary_data=True, class_count=5)]
    )
    logits = tensor.as_numpy("LOGITS")
    top5 = ranked.as_numpy("LOGITS")
    files = [("image", (f"{i}.jpg", body, "image/jpeg")) for i, body in enumerate(images)]
    v1 = httpx.post(f"{server}/v1/classify", files=files, timeout=30).json()["predictions"]
    np.testing.assert_array_equal(logits, np.array([p["logits"] for p in v1], dtype=np.float32))
    assert top5.shape == (3, 5)
    for row, prediction in zip(top5, v1, strict=True):
        parsed = [s.decode().split(":") for s in row]
        assert [(int(i), label) for _, i, label in parsed] == [(c["index"], c["label"]) for c in prediction["top_k"]]


def perf_analyzer(server: str, model: str, *extra: str) -> str:
    """bench/perf_analyzer.sh is what users run; here it is pointed at this test's server."""
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "PA_INTERVAL_MS": "1000",  # short windows, loose stability: this checks the protocol, not the speed
        "PA_ARGS": " ".join(["--stability-percentage", "50", "--max-trials", "6", *extra]),
    }
    result = subprocess.run(
        [str(REPO / "bench" / "perf_analyzer.sh"), server.removeprefix("http://"), model, "1:4:3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.timeout(600)
def test_perf_analyzer_runs_clean_with_fp32_tensors_and_real_jpegs(server: str) -> None:
    output = perf_analyzer(server, "tiny")
    for model in ("tiny_pixels, FP32", "tiny, real JPEGs"):
        assert model in output
    assert output.count("Concurrency: 1, throughput:") == 2 and output.count("Concurrency: 4, throughput:") == 2
    assert "error" not in output.lower()
