"""An OIP inference request, whatever its wire: the model's one input read and checked, the outputs asked for, the
`timeout` parameter; run through the engine; the outputs computed. Only the wire differs: `app.protocols.oip.rest`
reads and writes REST's JSON and binary bodies, `app.grpc.messages` gRPC's messages, both through this module.

Every reader checks the declared shape against `max_images` and the model's input before any element is read. All is
plain and synchronous but `run`, so an adapter can parse on a thread."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from app.engine.facade import Engine, Inference
from app.errors import BadRequest, InvalidParameter, PayloadTooLarge
from app.protocols.oip import tensors
from app.protocols.oip.models import EMBEDDING_OUTPUT, LOGITS_OUTPUT, OipModel

MAX_TENSORS = 16  # inputs or outputs named in one request: far more than any model here has


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """An input tensor as a request declares it."""

    name: str
    datatype: str
    shape: list[int]


@dataclass(frozen=True, slots=True)
class OutputSpec:
    """An output as a request asks for it."""

    name: str
    parameters: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    name: str
    binary: bool  # REST's binary data extension (gRPC answers every output raw)
    classification: int | None  # the classification extension's k


@dataclass(frozen=True, slots=True)
class InferRequest:
    data: np.ndarray | list[bytes]  # the model's one input: FP32 pixels (n, 3, h, w), or encoded images
    outputs: list[RequestedOutput]
    timeout_s: float | None
    id: str | None = None


@dataclass(frozen=True, slots=True)
class OutputTensor:
    name: str
    datatype: str  # "FP32", or "BYTES" for the classification extension's strings
    shape: list[int]
    values: np.ndarray | list[bytes]  # FP32 (n, size), or the strings row-major
    binary: bool

    def raw(self) -> bytes:
        """The values in the binary layout: FP32 little-endian; BYTES each a 4-byte little-endian length and bytes."""
        if isinstance(self.values, np.ndarray):
            return self.values.astype("<f4").tobytes()
        return tensors.pack_bytes(self.values)


def the_input(inputs: Sequence[TensorSpec], model: OipModel) -> TensorSpec:
    """The model's one input, by name and datatype."""
    if len(inputs) != 1 or inputs[0].name != model.input_name:
        names = [i.name for i in inputs]
        raise BadRequest(
            f"model {model.name!r} takes one input {model.input_name!r}, not {names}", code="unknown_input"
        )
    spec = inputs[0]
    if spec.datatype != model.input_datatype:
        raise BadRequest(
            f"input {spec.name!r} has datatype {model.input_datatype}, not {spec.datatype}", code="invalid_datatype"
        )
    return spec


def read_binary(
    spec: TensorSpec, data: bytes | memoryview, model: OipModel, *, max_images: int
) -> np.ndarray | list[bytes]:
    """The input's data in the binary layout (REST's binary extension, gRPC's `raw_input_contents`)."""
    count = checked_batch(spec, model, max_images)
    if model.takes_pixels:
        return tensors.fp32_from_binary(data, spec.shape, spec.name)
    images = tensors.unpack_bytes(data, spec.name, limit=count)
    if len(images) != count:
        more = "more than " if len(images) > count else ""
        raise BadRequest(
            f"input {spec.name!r}: shape {spec.shape} holds {count} elements, the data {more}{min(len(images), count)}",
            code="invalid_shape",
        )
    return images


def read_values(
    spec: TensorSpec, values: Sequence[Any], model: OipModel, *, max_images: int
) -> np.ndarray | list[bytes]:
    """The input's data as typed elements, flat: floats for FP32, bytes for BYTES (gRPC's `contents`)."""
    count = checked_batch(spec, model, max_images)
    if model.takes_pixels:
        return tensors.fp32_from_values(values, spec.shape, spec.name)
    return tensors.bytes_from_values(values, spec.name, count=count)


def checked_batch(spec: TensorSpec, model: OipModel, max_images: int) -> int:
    """The batch size of the input's declared shape: [N, *the model's input dims], N from 1 to `max_images` (a
    BYTES input may also be [N]). Checked before any element is read: no shape can make the read cost more."""
    shape, dims = spec.shape, model.input_dims
    batch_shapes = ([-1, *dims],) if model.takes_pixels else ([-1], [-1, 1])
    if not shape or min(shape) < 0 or not any(len(shape) == len(s) and shape[1:] == s[1:] for s in batch_shapes):
        expected = f"[N, {', '.join(map(str, dims))}]" if model.takes_pixels else "[N] or [N, 1]"
        raise BadRequest(f"input {spec.name!r} must have shape {expected}, not {shape}", code="invalid_shape")
    count = shape[0]
    if count < 1:
        raise BadRequest(f"input {spec.name!r}: shape {shape} holds no image", code="no_image")
    if count > max_images:
        raise PayloadTooLarge(
            f"input {spec.name!r}: {count} images in one request; the limit is {max_images}", code="too_many_images"
        )
    return count


def requested_outputs(
    outputs: Sequence[OutputSpec] | None, parameters: Mapping[str, Any], model: OipModel
) -> list[RequestedOutput]:
    """The outputs asked for; none named means every output the model has (the protocol's rule)."""
    default_binary = bool_parameter(parameters, "binary_data_output", False)
    if outputs is None:
        return [RequestedOutput(name, binary=default_binary, classification=None) for name in model.outputs]
    if not outputs:
        raise BadRequest("outputs, when given, must name at least one output", code="invalid_body")
    if len(outputs) > MAX_TENSORS:
        raise BadRequest(f"{len(outputs)} outputs named; the most is {MAX_TENSORS}", code="invalid_body")
    requested = []
    for output in outputs:
        if output.name not in model.outputs:
            raise BadRequest(
                f"model {model.name!r} has no output {output.name!r}; its outputs are {', '.join(model.outputs)}",
                code="unknown_output",
            )
        k = output.parameters.get("classification")
        if k is not None and output.name != LOGITS_OUTPUT:
            raise InvalidParameter(f"classification is a parameter of output {LOGITS_OUTPUT}, not {output.name}")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= model.info.num_classes):
            raise InvalidParameter(f"classification must be an integer from 1 to {model.info.num_classes}, not {k!r}")
        binary = bool_parameter(output.parameters, "binary_data", default_binary)
        requested.append(RequestedOutput(output.name, binary=binary, classification=k))
    return requested


def timeout_s(parameters: Mapping[str, Any]) -> float | None:
    """The request's `timeout` parameter in microseconds (0 or absent: the server's own timeout)."""
    timeout = parameters.get("timeout")
    if timeout is None or timeout == 0:
        return None
    if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 0:
        raise InvalidParameter(f"parameter timeout must be a whole number of microseconds, not {timeout!r}")
    return timeout / 1_000_000


def bool_parameter(parameters: Mapping[str, Any], name: str, default: bool) -> bool:
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise InvalidParameter(f"parameter {name} must be true or false, not {value!r}")
    return value


async def run(engine: Engine, model: OipModel, request: InferRequest) -> tuple[Inference, list[OutputTensor]]:
    """The request through the engine (the same batcher as every other request for the model), and its outputs."""
    if isinstance(request.data, np.ndarray):
        pixels = torch.from_numpy(request.data)
        inference = await engine.infer_pixels(pixels, model=model.info.name, timeout_s=request.timeout_s)
    else:
        inference = await engine.infer(request.data, model=model.info.name, timeout_s=request.timeout_s)
    return inference, outputs(model, inference, request.outputs)


def outputs(model: OipModel, inference: Inference, requested: Sequence[RequestedOutput]) -> list[OutputTensor]:
    rows = {
        LOGITS_OUTPUT: torch.stack([o.logits for o in inference.outputs]).numpy(),  # (n, num_classes) float32
        EMBEDDING_OUTPUT: torch.stack([o.embedding for o in inference.outputs]).numpy(),  # (n, dim) float32
    }
    computed = []
    for output in requested:
        array = rows[output.name]
        if output.classification is None:
            tensor = OutputTensor(output.name, "FP32", list(array.shape), array, output.binary)
        else:
            k = output.classification
            strings = _classification(array, k, model.labels)
            tensor = OutputTensor(output.name, "BYTES", [array.shape[0], k], strings, output.binary)
        computed.append(tensor)
    return computed


def _classification(logits: np.ndarray, k: int, labels: list[str]) -> list[bytes]:
    """Triton's classification extension: per image the k largest output values as "value:index:label", best
    first (row-major [N, k]). The value is the LOGITS output's own value, as Triton reports it."""
    strings: list[bytes] = []
    for row in logits:
        best = np.argsort(-row, kind="stable")[:k]
        strings.extend(f"{row[i]:f}:{i}:{labels[i]}".encode() for i in best)
    return strings
