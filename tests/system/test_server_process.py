"""The real `vit-serve` process on a free port: start, ready, classify over TCP, refuse bad input, drain on SIGTERM."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.support.processes import chelsea_jpeg, free_port, start, stop, tiny_server_process, wait_ready

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def tiny_server(tmp_path: Path) -> Iterator[str]:
    with tiny_server_process(tmp_path) as url:
        yield url


def test_the_server_process_classifies_over_tcp_and_survives_bad_input(tiny_server: str) -> None:
    with httpx.Client(base_url=tiny_server, timeout=30) as client:
        assert client.get("/healthz").status_code == 200
        good = client.post("/v1/classify", content=chelsea_jpeg(), headers={"Content-Type": "image/jpeg"})
        assert good.status_code == 200
        assert len(good.json()["predictions"][0]["top_k"]) == 5
        truncated = chelsea_jpeg()[:5000]
        bad = client.post("/v1/classify", content=truncated, headers={"Content-Type": "image/jpeg"})
        assert bad.status_code == 400 and bad.json()["code"] == "invalid_image"
        again = client.post("/v1/classify", content=chelsea_jpeg(), headers={"Content-Type": "image/jpeg"})
        assert again.json() == good.json()


def test_the_shipped_repository_serves_vit_b_16_with_random_weights() -> None:
    """What `VIT_WEIGHTS=random make run` does on a machine with no network."""
    port = free_port()
    env = {"VIT_WEIGHTS": "random", "VIT_MAX_BATCH_SIZE": "1", "VIT_PORT": str(port)}
    server = start([], cwd=REPO, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(server, url)
        info = httpx.get(f"{url}/v1/models/vit_b_16").json()
        assert info["weights"] == "random" and info["num_params"] == 86_567_656
        response = httpx.post(
            f"{url}/v1/classify?logits=false", content=chelsea_jpeg(), headers={"X-Request-ID": "smoke-1"}, timeout=60
        )
        assert response.status_code == 200 and response.json()["model"] == "vit_b_16"
        assert 'vit_images_total{model="vit_b_16"} 1.0' in httpx.get(f"{url}/metrics").text
    finally:
        output = stop(server)
    assert "serves RANDOM weights" in output
    access = [orjson.loads(line) for line in output.splitlines() if '"logger":"app.access"' in line]
    assert [(a["path"], a["status"]) for a in access] == [("/v1/models/vit_b_16", 200), ("/v1/classify", 200)]
    assert access[1]["request_id"] == "smoke-1" and access[1]["images"] == 1 and access[1]["inference_ms"] > 0


def test_without_network_the_default_model_fails_at_start_with_what_to_do(tmp_path: Path) -> None:
    """Pretrained weights that cannot be downloaded: one line, non-zero exit, nothing served."""
    port = free_port()
    cache = tmp_path / "cache"
    env = {"VIT_WEIGHTS_CACHE_DIR": str(cache), "VIT_PORT": str(port), "VIT_MODEL": "vit_b_32"}
    # Point torch.hub at an address that refuses at once, so the test never depends on this machine's network.
    env |= {"HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    server = start([], cwd=REPO, env=env)
    output = server.wait(timeout_s=120)
    assert server.process.returncode == 1
    last = output.strip().splitlines()[-1]
    assert last.startswith("vit-serve: model 'vit_b_32': cannot download pretrained weights vit_b_32.IMAGENET1K_V1")
    assert "`random` for a smoke test" in last
