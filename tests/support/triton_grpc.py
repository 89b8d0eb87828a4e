"""NVIDIA's tritonclient.grpc against a running server, as a script that prints what it saw as JSON.

Run with `sys.executable tests/support/triton_grpc.py --url HOST:PORT --scenario NAME [--images JPEG ...]`, never
imported by the tests: tritonclient's generated modules define the protocol's `inference.*` messages, as the server's
do, and one process cannot hold both.

Scenarios: `describe` (health, metadata, config), `infer` (JPEGs as BYTES, `--pixels` as FP32, classification, the
request id), `concurrent` (the aio client: every image alone, then all at once), `errors` (a bad image, an unknown
model), `auth` (ModelInfer without, with a wrong, and with `--api-key`), `call` (every image in one call).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

MODEL = "tiny"


def image_input(images: list[bytes], module: Any = triton) -> Any:
    tensor = module.InferInput("IMAGE", [len(images), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=object).reshape(-1, 1))
    return tensor


def status_of(call: Callable[[], Any]) -> dict[str, str]:
    """The gRPC status of a call, as tritonclient reports it: "OK", or the code and message of its error."""
    try:
        call()
    except InferenceServerException as exc:
        return {"status": str(exc.status()), "message": str(exc.message())}
    return {"status": "OK", "message": ""}


def describe(args: argparse.Namespace, images: list[bytes]) -> dict[str, Any]:
    with triton.InferenceServerClient(args.url) as client:
        return {
            "live": client.is_server_live(),
            "ready": client.is_server_ready(),
            "model_ready": client.is_model_ready(MODEL),
            "pixels_model_ready": client.is_model_ready(f"{MODEL}_pixels"),
            "server": client.get_server_metadata(as_json=True),
            "metadata": client.get_model_metadata(MODEL, as_json=True),
            "pixels_metadata": client.get_model_metadata(f"{MODEL}_pixels", as_json=True),
            "config": client.get_model_config(MODEL, as_json=True)["config"],
        }


def infer(args: argparse.Namespace, images: list[bytes]) -> dict[str, Any]:
    pixels = np.load(args.pixels)
    logits = triton.InferRequestedOutput("LOGITS")
    with triton.InferenceServerClient(args.url) as client:
        tensor = client.infer(MODEL, [image_input(images)], outputs=[logits], request_id="bytes-1")
        top3 = triton.InferRequestedOutput("LOGITS", class_count=3)
        ranked = client.infer(MODEL, [image_input(images)], outputs=[top3])
        pixel_input = triton.InferInput("PIXELS", list(pixels.shape), "FP32")
        pixel_input.set_data_from_numpy(pixels)
        from_pixels = client.infer(f"{MODEL}_pixels", [pixel_input], outputs=[logits], request_id="pixels-1")
    return {
        "logits": tensor.as_numpy("LOGITS").tolist(),
        "id": tensor.get_response().id,
        "model_name": tensor.get_response().model_name,
        "top3": [[s.decode() for s in row] for row in ranked.as_numpy("LOGITS")],
        "pixels_logits": from_pixels.as_numpy("LOGITS").tolist(),
        "pixels_id": from_pixels.get_response().id,
    }


async def concurrent(args: argparse.Namespace, images: list[bytes]) -> dict[str, Any]:
    """Each image alone, one after another; then every image at once, each its own call (aio client)."""
    async with triton_aio.InferenceServerClient(args.url) as client:

        async def one(index: int, image: bytes) -> tuple[str, list[float]]:
            result = await client.infer(MODEL, [image_input([image], triton_aio)], request_id=f"call-{index}")
            return result.get_response().id, result.as_numpy("LOGITS")[0].tolist()

        alone = [await one(i, image) for i, image in enumerate(images)]
        together = await asyncio.gather(*(one(i, image) for i, image in enumerate(images)))
    return {
        "alone": [logits for _, logits in alone],
        "together": [logits for _, logits in together],
        "ids": [request_id for request_id, _ in together],
    }


def errors(args: argparse.Namespace, images: list[bytes]) -> dict[str, Any]:
    bad = [images[0], b"\xff\xd8\xff\xe0 not a JPEG after all"]
    with triton.InferenceServerClient(args.url) as client:
        return {
            "bad_image": status_of(lambda: client.infer(MODEL, [image_input(bad)])),
            "unknown_model": status_of(lambda: client.infer("no_such_model", [image_input(images[:1])])),
        }


def auth(args: argparse.Namespace, images: list[bytes]) -> dict[str, Any]:
    """Without a key, with a wrong one; then with the key, four calls, each on a connection of its own (a client
    each: with workers, the connections are spread over them); the probes without a key."""

    def infer_with(headers: dict[str, str]) -> Callable[[], Any]:
        def call() -> Any:
            with triton.InferenceServerClient(args.url) as client:
                return client.infer(MODEL, [image_input(images[:1])], headers=headers)

        return call

    with triton.InferenceServerClient(args.url) as client:
        probes = client.is_server_live() and client.is_server_ready()
    return {
        "without_key": status_of(infer_with({})),
        "wrong_key": status_of(infer_with({"authorization": "Bearer wrong"})),
        "with_key": [status_of(infer_with({"authorization": f"Bearer {args.api_key}"})) for _ in range(4)],
        "probes_without_key": probes,
    }


def call(args: argparse.Namespace, images: list[bytes]) -> dict[str, Any]:
    """Every image in one call, with the request id `call-1` (metadata x-request-id too: the access line's)."""
    with triton.InferenceServerClient(args.url) as client:
        result = client.infer(
            MODEL, [image_input(images)], request_id="call-1", headers={"x-request-id": "call-1"}, client_timeout=120
        )
    return {"id": result.get_response().id, "logits": result.as_numpy("LOGITS").tolist()}


SCENARIOS = {"describe": describe, "infer": infer, "errors": errors, "auth": auth, "call": call}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="HOST:PORT of the gRPC service")
    parser.add_argument("--scenario", required=True, choices=[*SCENARIOS, "concurrent"])
    parser.add_argument("--images", nargs="*", type=Path, default=[])
    parser.add_argument("--pixels", type=Path, help="an .npy file of FP32 pixels (infer)")
    parser.add_argument("--api-key")
    args = parser.parse_args(argv)
    images = [path.read_bytes() for path in args.images]
    if args.scenario == "concurrent":
        result = asyncio.run(concurrent(args, images))
    else:
        result = SCENARIOS[args.scenario](args, images)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
