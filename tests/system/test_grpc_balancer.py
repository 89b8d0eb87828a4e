"""The shipped gRPC balancer rules (deploy/nginx/vit-serve-grpc-proxy.conf) with Debian's nginx on loopback, in front
of a replica that is gone (its port refuses connections) and a real one: every call is answered by the real one, as
it answers directly; the API key reaches it, and its status and trailers reach the client."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from app.grpc.proto import inference_pb2, inference_pb2_grpc
from tests.support.load_balancer import access_log, nginx
from tests.support.photos import jpeg, photo
from tests.support.processes import free_port, tiny_server, write_tiny_model

pytestmark = pytest.mark.slow

KEY = "balancer-key"
AUTHORIZED = (("authorization", f"Bearer {KEY}"),)
CALLS = 6
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def inference(channel: grpc.Channel) -> inference_pb2_grpc.GRPCInferenceServiceStub:
    return inference_pb2_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]


def classify(image: bytes) -> inference_pb2.ModelInferRequest:
    tensor = inference_pb2.ModelInferRequest.InferInputTensor(name="IMAGE", datatype="BYTES", shape=[1, 1])
    data = struct.pack("<I", len(image)) + image  # a BYTES element: its length, then its bytes
    return inference_pb2.ModelInferRequest(model_name="tiny", id="cat", inputs=[tensor], raw_input_contents=[data])


def test_calls_pass_nginx_to_a_live_replica_past_one_that_is_gone(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    write_tiny_model(repository)
    grpc_port = free_port()
    live, gone = f"127.0.0.1:{grpc_port}", f"127.0.0.1:{free_port()}"  # nothing listens on the second
    request = classify(jpeg(photo("chelsea")))
    serving = ("--grpc-port", str(grpc_port), "--api-keys", KEY, "--decode-workers", "1", "--torch-threads", "1")
    with tiny_server(repository, *serving):
        with grpc.insecure_channel(live) as direct:
            expected = inference(direct).ModelInfer(request, metadata=AUTHORIZED, timeout=30)
        balancer = tmp_path / "nginx"
        with (
            nginx(balancer, free_port(), [gone, live], grpc=True) as address,
            grpc.insecure_channel(address) as channel,
        ):
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            answers = [inference(channel).ModelInfer(request, metadata=AUTHORIZED, timeout=30) for _ in range(CALLS)]
            with pytest.raises(grpc.RpcError) as refused:
                inference(channel).ModelInfer(request, timeout=30)  # no key
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert {(a.id, tuple(a.raw_output_contents)) for a in answers} == {("cat", tuple(expected.raw_output_contents))}
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    trailers: Any = refused.value.trailing_metadata()  # typed bytes; an ASCII key's value arrives as str
    assert dict(trailers)["vit-error-code"] == "unauthorized"
    tried = [entry.replicas for entry in access_log(balancer) if entry.uri == MODEL_INFER]
    assert len(tried) == CALLS + 1 and all(replicas[-1] == live for replicas in tried)
    assert [gone, live] in tried  # round robin sent calls to the gone replica too: nginx moved them on
