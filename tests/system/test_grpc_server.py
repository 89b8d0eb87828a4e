"""The Open Inference Protocol over gRPC against a real server process: NVIDIA's tritonclient.grpc (in a subprocess:
tests/support/triton_grpc.py) and perf_analyzer -i grpc; the standard health service and reflection (their own
clients, here); workers and API keys; a taken port; the drain on SIGTERM.

One server serves the module; the drain test, last, ends it. Another, with two workers and an API key, serves one test.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from app.grpc.proto import inference_pb2, inference_pb2_grpc
from tests.support.load import metric
from tests.support.photos import NAMES, jpeg, photo
from tests.support.processes import (
    ServerProcess,
    access_lines,
    free_port,
    start_tiny,
    tiny_server,
    write_tiny_model,
)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
INFERENCE = "inference.GRPCInferenceService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class Served:
    url: str  # HTTP
    target: str  # gRPC: host:port
    process: ServerProcess


@contextmanager
def grpc_server(repository: Path, *args: str) -> Iterator[Served]:
    """A tiny server (tests.support.processes) with gRPC on a free port of its own."""
    port = free_port()
    with tiny_server(repository, "--grpc-port", str(port), *args) as (url, process):
        yield Served(url, f"127.0.0.1:{port}", process)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    # One decode thread: a call of many large photographs stays in flight for seconds (the drain test).
    with grpc_server(tmp_path_factory.mktemp("repo"), "--decode-workers", "1") as served:
        yield served


@pytest.fixture(scope="module")
def photographs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Real JPEGs: scikit-image's photographs."""
    folder = tmp_path_factory.mktemp("photographs")
    paths = []
    for name in ("chelsea", "astronaut", "coffee"):
        (path := folder / f"{name}.jpg").write_bytes(jpeg(photo(name)))
        paths.append(path)
    return paths


def triton_grpc(target: str, scenario: str, *images: Path, **options: str) -> Any:
    """tests/support/triton_grpc.py run on `target`: what it printed, parsed."""
    command = [sys.executable, str(REPO / "tests" / "support" / "triton_grpc.py"), "--url", target]
    command += ["--scenario", scenario, "--images", *map(str, images)]
    for name, value in options.items():
        command += [f"--{name.replace('_', '-')}", value]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def classify_over_http(url: str, images: list[Path], **params: int) -> list[dict[str, Any]]:
    files = [("image", (path.name, path.read_bytes(), "image/jpeg")) for path in images]
    response = httpx.post(f"{url}/v1/classify", files=files, params=params, timeout=60)
    assert response.status_code == 200, response.text
    predictions: list[dict[str, Any]] = response.json()["predictions"]
    return predictions


def test_tritonclient_grpc_health_metadata_and_config_say_what_http_says(server: Served) -> None:
    seen = triton_grpc(server.target, "describe")
    assert seen["live"] and seen["ready"] and seen["model_ready"] and seen["pixels_model_ready"]
    assert seen["server"]["name"] == httpx.get(f"{server.url}/v2").json()["name"]
    for model in ("tiny", "tiny_pixels"):
        over_http = httpx.get(f"{server.url}/v2/models/{model}").json()
        over_grpc = seen["metadata" if model == "tiny" else "pixels_metadata"]
        for tensors in ("inputs", "outputs"):  # protobuf's JSON writes int64 as strings
            got = [{**t, "shape": [int(d) for d in t["shape"]]} for t in over_grpc[tensors]]
            assert got == [{k: t[k] for k in ("name", "datatype", "shape")} for t in over_http[tensors]]
    assert seen["metadata"]["inputs"][0] == {"name": "IMAGE", "datatype": "BYTES", "shape": ["-1", "1"]}
    assert seen["config"]["max_batch_size"] == httpx.get(f"{server.url}/v2/models/tiny/config").json()["max_batch_size"]


def test_inference_over_grpc_answers_as_http_jpegs_pixels_and_classification(
    server: Served, photographs: list[Path], tmp_path: Path
) -> None:
    pixels = np.random.default_rng(7).standard_normal((2, 3, 64, 64)).astype(np.float32)
    np.save(pixels_file := tmp_path / "pixels.npy", pixels)
    seen = triton_grpc(server.target, "infer", *photographs, pixels=str(pixels_file))

    v1 = classify_over_http(server.url, photographs, top_k=3)
    got, want = np.array(seen["logits"], np.float32), np.array([p["logits"] for p in v1], np.float32)
    np.testing.assert_array_equal(got, want)
    assert (seen["id"], seen["model_name"]) == ("bytes-1", "tiny")
    for row, prediction in zip(seen["top3"], v1, strict=True):  # "value:index:label", best first
        assert [(int(i), label) for _, i, label in (s.split(":") for s in row)] == [
            (c["index"], c["label"]) for c in prediction["top_k"]
        ]

    client = triton_http.InferenceServerClient(server.url.removeprefix("http://"))
    tensor = triton_http.InferInput("PIXELS", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=True)
    over_http = client.infer("tiny_pixels", [tensor]).as_numpy("LOGITS")
    np.testing.assert_array_equal(np.array(seen["pixels_logits"], np.float32), over_http)
    assert seen["pixels_id"] == "pixels-1"


def test_concurrent_aio_calls_each_get_their_own_answer(server: Served, tmp_path: Path) -> None:
    images = []
    for i in range(32):  # 32 different pictures: six photographs at different sizes
        (path := tmp_path / f"{i}.jpg").write_bytes(jpeg(photo(NAMES[i % 6]), size=(96 + 16 * i, 80 + 8 * i)))
        images.append(path)
    seen = triton_grpc(server.target, "concurrent", *images)

    alone, together = np.array(seen["alone"]), np.array(seen["together"])
    assert len(np.unique(alone.round(4), axis=0)) == 32  # different answers: a mix-up would show
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)  # a batch sums in another order
    assert seen["ids"] == [f"call-{i}" for i in range(32)]


def test_a_bad_image_and_an_unknown_model_get_their_status_codes(server: Served, photographs: list[Path]) -> None:
    seen = triton_grpc(server.target, "errors", *photographs)
    assert seen["bad_image"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "image 1" in seen["bad_image"]["message"], seen
    assert seen["unknown_model"]["status"] == "StatusCode.NOT_FOUND"
    assert "no_such_model" in seen["unknown_model"]["message"]


def perf_analyzer(target: str, model: str, *options: str) -> str:
    """NVIDIA's perf_analyzer over gRPC, as bench/perf_analyzer.sh finds it, at concurrency 1 and 16."""
    found = os.environ.get("PERF_ANALYZER") or shutil.which("perf_analyzer")
    command = [found or str(REPO / "bench" / "perf_analyzer_debian12.sh"), "-m", model, "-u", target, "-i", "grpc"]
    command += ["--concurrency-range", "1:16:15", "--measurement-interval", "1000"]  # short windows: the protocol,
    command += ["--stability-percentage", "50", "--max-trials", "6", *options]  # not the speed, is checked
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.timeout(600)
def test_perf_analyzer_over_grpc_runs_clean_with_fp32_tensors_and_real_jpegs(
    server: Served, photographs: list[Path], tmp_path: Path
) -> None:
    # A BYTES element of perf_analyzer's input file: base64 of a 4-byte little-endian length, then the bytes.
    entries = [
        {"IMAGE": {"b64": base64.b64encode(struct.pack("<I", len(b)) + b).decode()}}
        for b in (path.read_bytes() for path in photographs)
    ]
    (data := tmp_path / "jpegs.json").write_text(json.dumps({"data": entries}))
    outputs = [
        perf_analyzer(server.target, "tiny_pixels", "--input-data", "zero"),  # zeros: random bytes hold NaNs
        perf_analyzer(server.target, "tiny", "--input-data", str(data)),
    ]
    for output in outputs:
        assert "Concurrency: 1, throughput:" in output and "Concurrency: 16, throughput:" in output, output
        assert "error" not in output.lower(), output


def test_health_says_serving_and_reflection_lists_the_services(server: Served) -> None:
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", INFERENCE):
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

        reflected = ProtoReflectionDescriptorDatabase(channel)
        assert {INFERENCE, "grpc.health.v1.Health"} <= set(reflected.get_services())
        methods = DescriptorPool(reflected).FindServiceByName(INFERENCE).methods_by_name
        assert {"ServerLive", "ServerReady", "ModelMetadata", "ModelConfig", "ModelInfer"} <= set(methods)


def test_a_taken_grpc_port_fails_the_start_once_with_one_line(tmp_path: Path) -> None:
    """Before the warm-up: in the one process (once its models are loaded), and in the workers' supervisor before any
    worker starts (so once, not in each)."""
    write_tiny_model(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for workers in ("1", "2"):
            server = start_tiny(tmp_path, free_port(), "--grpc-port", str(port), "--workers", workers)
            output = server.wait(timeout_s=60)
            assert server.process.returncode == 1, output
            assert output.count(f"cannot serve gRPC on 127.0.0.1:{port}: Address already in use") == 1, output
            assert "Traceback" not in output and "warming up" not in output and "worker 0 started" not in output


def test_workers_serve_grpc_on_one_port_and_api_keys_guard_it_but_not_health(
    tmp_path: Path, photographs: list[Path]
) -> None:
    with grpc_server(tmp_path, "--workers", "2", "--api-keys", "k") as served:
        seen = triton_grpc(served.target, "auth", *photographs, api_key="k")
        with grpc.insecure_channel(served.target) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    output = served.process.output()  # all of it, once stopped
    assert seen["without_key"]["status"] == seen["wrong_key"]["status"] == "StatusCode.UNAUTHENTICATED"
    assert [answer["status"] for answer in seen["with_key"]] == ["OK"] * 4
    assert seen["probes_without_key"] and check.status == SERVING
    # Each worker serves gRPC on the one port (one start line each, from two processes), from the start barrier on.
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    port = int(served.target.split(":")[1])
    grpc_started = {line["pid"]: n for n, line in enumerate(lines) if line.get("grpc_port") == port}
    assert len(grpc_started) == 2
    for pid, n in grpc_started.items():
        barrier = next(i for i, line in enumerate(lines) if line["message"] == f"worker {pid} taking connections")
        assert barrier < n


def test_sigterm_flips_health_refuses_new_calls_and_answers_the_call_in_flight(server: Served, tmp_path: Path) -> None:
    """Last in the module: it ends the server. A call of 64 large photographs, decoded one at a time, is in flight
    (its images admitted) when SIGTERM comes."""
    large = tmp_path / "large.jpg"
    large.write_bytes(jpeg(photo("chelsea"), size=(2400, 1600)))
    with grpc.insecure_channel(server.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=120)
        assert next(watch).status == SERVING
        call: dict[str, Any] = {}
        caller = threading.Thread(target=lambda: call.update(triton_grpc(server.target, "call", *[large] * 64)))
        caller.start()
        deadline = time.monotonic() + 120
        while metric(httpx.get(f"{server.url}/metrics").text, 'vit_queue_depth{model="tiny"}') == 0:
            assert time.monotonic() < deadline and caller.is_alive(), "the call never reached the server"
            time.sleep(0.05)
        server.process.process.send_signal(signal.SIGTERM)

        assert next(watch).status == NOT_SERVING
        assert list(watch) == []  # the stream ends with the drain: it does not hold the drain open
        refused = refused_call(channel, large.read_bytes())
        caller.join(timeout=120)
    output = server.process.wait(timeout_s=60)
    assert server.process.process.returncode == 0, output
    assert refused == grpc.StatusCode.UNAVAILABLE
    assert call["id"] == "call-1" and len(call["logits"]) == 64
    # The call was answered after the drain began, before the engine stopped.
    after_sigterm = output[output.index('"signal":"SIGTERM"') :]
    answered = [line for line in access_lines(after_sigterm) if line["request_id"] == "call-1"]
    assert [line["status"] for line in answered] == ["OK"]
    assert after_sigterm.index('"request_id":"call-1"') < after_sigterm.index("gRPC server stopped")
    assert after_sigterm.index("gRPC server stopped") < after_sigterm.index("the engine stopped")


def refused_call(channel: grpc.Channel, image: bytes) -> grpc.StatusCode:
    """A new ModelInfer, once the drain has begun: its status (refused by the engine, or by gRPC once it stopped)."""
    request = inference_pb2.ModelInferRequest(
        model_name="tiny",
        inputs=[inference_pb2.ModelInferRequest.InferInputTensor(name="IMAGE", datatype="BYTES", shape=[1, 1])],
        raw_input_contents=[struct.pack("<I", len(image)) + image],
    )
    try:
        inference_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)  # type: ignore[no-untyped-call]
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK
