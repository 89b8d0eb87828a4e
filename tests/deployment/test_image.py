"""The container image itself, built from the Dockerfile and started (`make image-test`): what a user deploys is what
these checks run. The server runs from the image through `buildah run` (chroot isolation, the host's network: the
machine has no Docker engine, and podman cannot run containers here), as the image's own user, with its entry point,
environment and health check read from the image's configuration."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from tests.support import container_image
from tests.support.load import assert_same_prediction, classifying, load
from tests.support.photos import jpeg, photo
from tests.support.processes import (
    ServerProcess,
    access_lines,
    free_port,
    tiny_server,
    wait_ready,
    write_tiny_model,
)

pytestmark = [pytest.mark.slow, pytest.mark.image]
TAG = "localhost/vit-serve:image-test"
# No weights baked in (they would be downloaded at build time): the checks serve a tiny real ViT, mounted. More
# build arguments (`make image-test IMAGE_BUILD_ARGS="KEY=VALUE ..."`) check a variant.
BUILD_ARGS = ["BAKE_WEIGHTS=", *os.environ.get("VIT_IMAGE_BUILD_ARGS", "").split()]


@dataclass(frozen=True)
class Image:
    tag: str
    config: dict[str, Any]  # the Docker-format image configuration: User, Env, Entrypoint, Cmd, Healthcheck, ...

    @property
    def env(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.config["Env"])

    @property
    def command(self) -> list[str]:
        """What `docker run IMAGE` runs: the entry point and the default arguments."""
        return [*self.config["Entrypoint"], *self.config["Cmd"]]


def clean_tree(destination: Path) -> Path:
    """The files a clone of this working tree would have (tracked and not ignored): no venv, no build output."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=container_image.REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = container_image.REPO / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    """Built from a clean copy of the tree; the engine's layer cache makes an unchanged rebuild quick."""
    if shutil.which("buildah") is None:
        container_image.apt_install("buildah", "podman")
    tree = clean_tree(tmp_path_factory.mktemp("tree"))
    container_image.build(TAG, BUILD_ARGS, context=tree, tool="buildah")  # what runs it here
    return Image(TAG, container_image.image_config(TAG))


def shared_model(folder: Path) -> Path:
    """The tiny model, readable by the image's unprivileged user (pytest's folders are the owner's alone)."""
    write_tiny_model(folder)
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return folder


@dataclass
class Served:
    url: str
    container: str
    server: ServerProcess  # `buildah run`, whose output is the server's
    pid: int  # the server itself
    grpc_address: str  # its gRPC service (a free port: the container has the host's network)


@contextmanager
def served_from_image(image: Image, models: Path, **env: str) -> Iterator[Served]:
    """The image's own command (`vit-serve serve`) in a container on a free port, serving the tiny model from
    `models`, mounted where the image looks for models; stopped with SIGTERM at the end unless the test did."""
    port = free_port()
    # The container has the host's network: a free port for gRPC too, not the image's 8001.
    grpc_port = free_port()
    env = {"VIT_PORT": str(port), "VIT_GRPC_PORT": str(grpc_port), "VIT_HOST": "127.0.0.1", "VIT_MODEL": "tiny", **env}
    with container_image.container(image.tag) as name:
        log = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115  (closed by ServerProcess.wait)
        command = container_image.run_command(name, image.command, env, {models: image.env["VIT_MODEL_REPOSITORY"]})
        server = ServerProcess(subprocess.Popen(command, stdout=log, stderr=log), log)
        pid = container_image.started_command(server.process)
        served = Served(f"http://127.0.0.1:{port}", name, server, pid, f"127.0.0.1:{grpc_port}")
        try:
            wait_ready(server, served.url, timeout_s=300)
            yield served
        finally:
            if server.process.poll() is None:
                os.kill(served.pid, signal.SIGTERM)
            server.wait(timeout_s=60)


def read_only_command(image: Image, root: Path, target: Path, models: Path, env: dict[str, str]) -> list[str]:
    """`docker run --read-only --tmpfs /tmp -v MODELS:...:ro` by hand, since `buildah run` needs to write its mount
    points into the root: in a mount namespace of its own, the container's root bound read-only, /proc, /dev and a
    tmpfs on /tmp over it, then chroot to it as the image's user, in its working directory, with its environment."""
    user = image.config["User"]
    environment = [f"{key}={value}" for key, value in {**image.env, "HOME": "/home/vit", **env}.items()]
    script = f"""set -e
mkdir -p {target}
mount --bind {root} {target} && mount -o remount,bind,ro {target}
if touch {target}/written 2>/dev/null; then echo "the root is writable" >&2; exit 1; fi
mount -t proc proc {target}/proc && mount --rbind /dev {target}/dev && mount -t tmpfs -o mode=1777 tmpfs {target}/tmp
mount --bind {models} {target}{image.env["VIT_MODEL_REPOSITORY"]}
mount -o remount,bind,ro {target}{image.env["VIT_MODEL_REPOSITORY"]}
exec chroot --userspec={user} {target} env -i -C {image.config["WorkingDir"]} "$@"
"""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *environment, *image.command]


def test_the_entry_point_runs_as_the_unprivileged_user(image: Image) -> None:
    assert image.config["User"] == "10001:10001"
    with container_image.container(image.tag) as name:
        assert container_image.run_in(name, ["id", "-u"]).stdout.strip() == "10001"
        help_ = container_image.run_in(name, [*image.config["Entrypoint"], "--help"])
    assert help_.returncode == 0, help_.stderr
    assert "serve" in help_.stdout


def test_the_final_stage_has_no_compilers_build_files_or_pip_caches(image: Image) -> None:
    with container_image.container(image.tag) as name:
        root = container_image.mountpoint(name)
        for folder in ("usr/bin", "usr/local/bin", "opt/venv/bin"):
            for tool in ("gcc", "cc", "c++", "g++", "clang", "ld", "make"):
                assert not (root / folder / tool).exists(), f"{folder}/{tool}"
        for leftover in ("root/.cache", "home/vit/.cache", "src", "wheels", "tmp/requirements.txt"):
            assert not (root / leftover).exists(), leftover
        assert not (root / "etc/xdg/pip/pip.conf").exists()  # the build's mounted pip settings stayed out
        assert not list((root / "opt/venv").rglob("*.whl"))
        assert (root / "opt/vit-serve/models/vit_b_16/model.toml").is_file()  # models/ as the README says
        assert (root / "opt/vit-serve/weights").is_dir()
        pip_list = container_image.run_in(name, ["pip", "list", "--format", "json"])
    installed = {package["name"].lower() for package in json.loads(pip_list.stdout)}
    assert {"vit-serve", "torch", "torchvision", "fastapi", "uvicorn"} <= installed


def test_weights_not_baked_in_can_be_downloaded_into_the_cache_at_start_up(image: Image, tmp_path: Path) -> None:
    """Start-up downloads pretrained weights with torch.hub into VIT_WEIGHTS_CACHE_DIR, as the image's user: here
    from a file:// URL (the machine has no network), through the same call."""
    models = shared_model(tmp_path / "models")
    download = (
        "import os, torch.hub; state = torch.hub.load_state_dict_from_url('file:///mnt/models/tiny/weights.pth', "
        "model_dir=os.environ['VIT_WEIGHTS_CACHE_DIR'], progress=False, weights_only=True); print(len(state))"
    )
    with container_image.container(image.tag) as name:
        result = container_image.run_in(name, ["python", "-c", download], volumes={models: "/mnt/models"})
        cached = [path.name for path in (container_image.mountpoint(name) / "opt/vit-serve/weights").iterdir()]
    assert result.returncode == 0, result.stderr
    assert cached == ["weights.pth"]


def test_the_served_image_answers_as_the_source_tree_does(image: Image, tmp_path: Path) -> None:
    """Ready, its HEALTHCHECK passes inside the container, /metrics and the demo page answer, gRPC answers with the
    same logits as HTTP, and a photograph's classification equals the source tree's server's answer for the same
    weights (fp32 on the CPU, within 1e-5)."""
    models = shared_model(tmp_path / "models")
    body = jpeg(photo("astronaut"))
    health = image.config["Healthcheck"]["Test"]
    assert health[0] == "CMD"
    with served_from_image(image, models) as served:
        checked = container_image.run_in(served.container, health[1:], env={"VIT_PORT": served.url.rsplit(":", 1)[1]})
        assert checked.returncode == 0, checked.stderr
        from_image = httpx.post(
            f"{served.url}/v1/classify", content=body, headers={"Content-Type": "image/jpeg"}, timeout=60
        )
        over_grpc = grpc_logits(served.grpc_address, body)
        metrics = httpx.get(f"{served.url}/metrics", timeout=10)
        page, script = (httpx.get(f"{served.url}{path}", timeout=10) for path in ("/", "/static/demo.js"))
    assert page.status_code == 200 and "static/demo.js" in page.text  # the demo page ships in the wheel
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert from_image.status_code == 200, from_image.text
    assert metrics.status_code == 200 and 'vit_images_total{model="tiny"} 2.0' in metrics.text  # HTTP's and gRPC's
    with tiny_server(tmp_path / "source") as (source_url, _):
        from_source = httpx.post(
            f"{source_url}/v1/classify", content=body, headers={"Content-Type": "image/jpeg"}, timeout=60
        )
    got, want = from_image.json(), from_source.json()
    assert_same_prediction(got, want)
    assert got["predictions"][0]["logits"] == pytest.approx(want["predictions"][0]["logits"], abs=1e-5)
    # the gRPC modules generated in the image's build work: the same float32 logits as HTTP's (JSON) answer
    assert np.array_equal(np.array(over_grpc, np.float32), np.array(got["predictions"][0]["logits"], np.float32))


def grpc_logits(address: str, jpeg_bytes: bytes) -> list[float]:
    """The health service SERVING, then one ModelInfer of `jpeg_bytes`: its logits."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from app.grpc.proto import inference_pb2 as pb
    from app.grpc.proto import inference_pb2_grpc
    from app.protocols.oip.tensors import pack_bytes

    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        request = pb.ModelInferRequest(model_name="tiny")
        request.inputs.add(name="IMAGE", datatype="BYTES", shape=[1, 1])
        request.raw_input_contents.append(pack_bytes([jpeg_bytes]))
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        response = stub.ModelInfer(request, timeout=60)
    return [float(x) for x in np.frombuffer(response.raw_output_contents[0], dtype="<f4")]


def test_sigterm_under_load_drains_and_exits_0_with_nothing_lost(image: Image, tmp_path: Path) -> None:
    """As tests/system/test_shutdown.py does it for the source tree: a large photograph and a long batch window keep
    requests queued, so that SIGTERM lands while some are accepted and unanswered."""
    models = shared_model(tmp_path / "models")
    body = jpeg(photo("chelsea"), size=(1920, 1280))
    slow = {"VIT_MAX_QUEUE_DELAY_MS": "250", "VIT_MAX_BATCH_SIZE": "64", "VIT_DRAIN_TIMEOUT_S": "20"}
    with served_from_image(image, models, **slow) as served:
        url, server = served.url, served.server
        expected = httpx.post(f"{url}/v1/classify?logits=false", content=body, headers={"Content-Type": "image/jpeg"})
        with load(url, body, threads=6) as (outcomes, sigterm_sent):
            deadline = time.monotonic() + 60
            while len(outcomes) < 20 and time.monotonic() < deadline:
                time.sleep(0.05)
            while not classifying(url) and time.monotonic() < deadline:
                time.sleep(0.01)
            sigterm_sent.set()
            os.kill(served.pid, signal.SIGTERM)
            output = server.wait(timeout_s=60)
    assert server.process.returncode == 0, output
    assert "drain did not finish" not in output and "Application shutdown complete" in output
    answered = {outcome.request_id: outcome for outcome in outcomes}
    logged = {str(line["request_id"]): line for line in access_lines(output) if line["path"] == "/v1/classify"}
    lost = [rid for rid in logged if rid.startswith("load-") and answered[rid].status != logged[rid]["status"]]
    assert not lost, lost
    for outcome in outcomes:
        if outcome.status == 200:
            assert_same_prediction(orjson.loads(outcome.body), expected.json())
        elif outcome.status is not None:  # refused as the drain began
            assert (outcome.status, orjson.loads(outcome.body)["code"]) == (503, "not_ready")
        else:  # no answer: only once SIGTERM was sent, and only for requests the server had not read
            assert outcome.ended_after_sigterm and outcome.request_id not in logged, outcome
    draining_at = output.index('"signal":"SIGTERM"')
    assert any(line["status"] == 200 for line in access_lines(output[draining_at:]))  # in flight, then answered


def test_the_service_runs_on_a_read_only_root_with_a_tmpfs_on_tmp(image: Image, tmp_path: Path) -> None:
    """What `docker run --read-only --tmpfs /tmp` gives it: two workers (whose metrics files go to /tmp) start,
    answer and drain; nothing else is written."""
    models = shared_model(tmp_path / "models")
    port = free_port()
    env = {
        "VIT_PORT": str(port),
        "VIT_GRPC_PORT": str(free_port()),
        "VIT_HOST": "127.0.0.1",
        "VIT_MODEL": "tiny",
        "VIT_WORKERS": "2",
    }
    with container_image.container(image.tag) as name:
        root = container_image.mountpoint(name)
        log = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115  (closed by ServerProcess.wait)
        command = read_only_command(image, root, tmp_path / "root", models, env)
        server = ServerProcess(subprocess.Popen(command, stdout=log, stderr=log), log)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(server, url, timeout_s=300)
            answer = httpx.post(
                f"{url}/v1/classify", content=jpeg(photo("coffee")), headers={"Content-Type": "image/jpeg"}, timeout=60
            )
            metrics = httpx.get(f"{url}/metrics", timeout=10).text
        finally:
            if server.process.poll() is None:
                server.process.send_signal(signal.SIGTERM)  # the exec chain ends in the server itself
            output = server.wait(timeout_s=90)
        changed = list((root.parent / "diff").rglob("*")) if (root.parent / "diff").is_dir() else []
    assert server.process.returncode == 0, output
    assert answer.status_code == 200, answer.text
    assert 'vit_images_total{model="tiny"} 1.0' in metrics
    assert "Read-only file system" not in output
    assert changed == [], changed
