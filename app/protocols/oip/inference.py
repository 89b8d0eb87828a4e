"""An OIP inference request: parse it (JSON and binary tensors), run it through the engine, build the response.

`parse_request` does all the work that grows with the body (JSON, the tensor data, BYTES and base64), and none that
grows past the limits: the declared shape is checked against `max_images` and the model's input before any element
is read. It is plain and synchronous, so the HTTP layer can run it on a thread."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from app.engine.facade import Engine, Inference
from app.errors import BadRequest, InvalidParameter, PayloadTooLarge, describe_validation_error
from app.protocols.json_bounds import check_json_bounds, parse_json
from app.protocols.oip import tensors
from app.protocols.oip.models import EMBEDDING_OUTPUT, LOGITS_OUTPUT, VERSION, OipModel

MAX_TENSORS = 16  # inputs or outputs named in one request: far more than any model here has


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")  # other OIP clients add fields (model_name, ...): harmless


class RequestInput(_Lenient):
    name: str
    shape: list[StrictInt] = Field(max_length=8)
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: Any = None


class RequestOutput(_Lenient):
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferRequestBody(_Lenient):
    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[RequestInput] = Field(min_length=1, max_length=MAX_TENSORS)
    outputs: list[RequestOutput] | None = Field(default=None, max_length=MAX_TENSORS)


@dataclass(frozen=True, slots=True)
class InferRequest:
    body: InferRequestBody
    data: np.ndarray | list[bytes]  # the model's one input: FP32 pixels (n, 3, h, w), or encoded images


@dataclass(frozen=True, slots=True)
class InferResponse:
    header: bytes  # the JSON object
    binary: list[bytes]  # binary output data, in output order, after the JSON

    @property
    def is_binary(self) -> bool:
        return bool(self.binary)


def parse_request(body: bytes, header_length: int | None, model: OipModel, *, max_images: int) -> InferRequest:
    """The JSON object and the binary data after it, read into the model's input; `header_length` 0 means the whole
    body is raw input data."""
    if header_length == 0:
        return _raw_request(body, model, max_images)
    if header_length is not None and not 0 < header_length <= len(body):
        raise BadRequest(
            f"Inference-Header-Content-Length is {header_length} but the body has {len(body)} bytes",
            code="invalid_header_length",
        )
    end = len(body) if header_length is None else header_length
    header = body[:end]
    _check_json_bounds(header, model, max_images)
    try:
        parsed = InferRequestBody.model_validate(parse_json(header, what="JSON inference header"))
    except ValidationError as exc:
        raise InvalidParameter(
            f"invalid inference request: {describe_validation_error(exc)}", code="invalid_body"
        ) from None
    binary = _split_binary(parsed, memoryview(body)[end:])
    item = _the_input(parsed, model)
    return InferRequest(parsed, _read_input(item, binary.get(item.name), model, max_images))


def _check_json_bounds(header: bytes, model: OipModel, max_images: int) -> None:
    """The largest request this model takes: `max_images` elements of its input, as nested JSON arrays, and a few
    hundred more values and containers for the rest (names, parameters, outputs)."""
    per_image = math.prod(model.input_dims)
    arrays = level = 1  # a tensor [N, d1, ..., dk] nested row-major: 1 + N + N*d1 + ... + N*d1*...*d(k-1) arrays
    for size in (max_images, *model.input_dims[:-1]):
        level *= size
        arrays += level
    slack = 256
    check_json_bounds(header, max_containers=arrays + slack, max_values=max_images * per_image + slack)


def _read_input(
    item: RequestInput, binary: memoryview | None, model: OipModel, max_images: int
) -> np.ndarray | list[bytes]:
    """The input's data, once its shape is known to be the model's and within `max_images`."""
    count = _checked_batch(item, model, max_images)
    if model.takes_pixels:
        if binary is not None:
            return tensors.fp32_from_binary(binary, item.shape, item.name)
        return tensors.fp32_from_json(item.data, item.shape, item.name)
    if binary is None:
        return tensors.bytes_from_json(item.data, item.name, count=count)
    images = tensors.unpack_bytes(binary, item.name, limit=count)
    if len(images) != count:
        more = "more than " if len(images) > count else ""
        raise BadRequest(
            f"input {item.name!r}: shape {item.shape} holds {count} elements, the data {more}{min(len(images), count)}",
            code="invalid_shape",
        )
    return images


def _checked_batch(item: RequestInput, model: OipModel, max_images: int) -> int:
    """The batch size of the input's declared shape: [N, *the model's input dims], N from 1 to `max_images` (a
    BYTES input may also be [N]). Checked before any element is read: no shape can make the read cost more."""
    shape, dims = item.shape, model.input_dims
    batch_shapes = ([-1, *dims],) if model.takes_pixels else ([-1], [-1, 1])
    if not shape or min(shape) < 0 or not any(len(shape) == len(s) and shape[1:] == s[1:] for s in batch_shapes):
        expected = f"[N, {', '.join(map(str, dims))}]" if model.takes_pixels else "[N] or [N, 1]"
        raise BadRequest(f"input {item.name!r} must have shape {expected}, not {shape}", code="invalid_shape")
    count = shape[0]
    if count < 1:
        raise BadRequest(f"input {item.name!r}: shape {shape} holds no image", code="no_image")
    if count > max_images:
        raise PayloadTooLarge(
            f"input {item.name!r}: {count} images in one request; the limit is {max_images}", code="too_many_images"
        )
    return count


def _split_binary(body: InferRequestBody, data: memoryview) -> dict[str, memoryview]:
    chunks: dict[str, memoryview] = {}
    offset = 0
    for item in body.inputs:
        size = item.parameters.get("binary_data_size")
        if size is None:
            continue
        if not isinstance(size, int) or size < 0 or offset + size > len(data):
            raise BadRequest(
                f"input {item.name!r}: binary_data_size {size!r} does not fit the body", code="invalid_tensor"
            )
        chunks[item.name] = data[offset : offset + size]
        offset += size
    if offset != len(data):
        raise BadRequest(
            f"{len(data) - offset} bytes after the inputs' binary data are not claimed by any binary_data_size",
            code="invalid_tensor",
        )
    return chunks


def _raw_request(body: bytes, model: OipModel, max_images: int) -> InferRequest:
    """Triton's raw binary request: no JSON, the body is the model's one input, every output comes back binary."""
    if model.takes_pixels:
        per_image = 4 * math.prod(model.input_dims)
        if not body or len(body) % per_image:
            raise BadRequest(
                f"a raw FP32 body must be a multiple of {per_image} bytes (one image)", code="invalid_tensor"
            )
        shape = [len(body) // per_image, *model.input_dims]
    else:
        count = tensors.packed_count(body, limit=max_images)
        if not count:  # one bare encoded image
            body, count = tensors.pack_bytes([body]), 1
        shape = [count, 1]
    item = RequestInput(name=model.input_name, shape=shape, datatype=model.input_datatype)
    parsed = InferRequestBody(inputs=[item], parameters={"binary_data_output": True})
    return InferRequest(parsed, _read_input(item, memoryview(body), model, max_images))


async def run(engine: Engine, model: OipModel, request: InferRequest) -> tuple[Inference, InferResponse]:
    body = request.body
    outputs = _requested_outputs(body, model)
    timeout_s = _timeout_s(body.parameters)
    if isinstance(request.data, np.ndarray):
        pixels = torch.from_numpy(request.data)
        inference = await engine.infer_pixels(pixels, model=model.info.name, timeout_s=timeout_s)
    else:
        inference = await engine.infer(request.data, model=model.info.name, timeout_s=timeout_s)
    return inference, _response(body, model, inference, outputs)


@dataclass(frozen=True, slots=True)
class _Output:
    name: str
    binary: bool
    classification: int | None


def _requested_outputs(body: InferRequestBody, model: OipModel) -> list[_Output]:
    """The outputs asked for; none named means every output the model has (the protocol's rule)."""
    default_binary = _bool_parameter(body.parameters, "binary_data_output", False)
    if body.outputs is None:
        return [_Output(name, binary=default_binary, classification=None) for name in model.outputs]
    if not body.outputs:
        raise BadRequest("outputs, when given, must name at least one output", code="invalid_body")
    requested = []
    for output in body.outputs:
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
        binary = _bool_parameter(output.parameters, "binary_data", default_binary)
        requested.append(_Output(output.name, binary=binary, classification=k))
    return requested


def _the_input(body: InferRequestBody, model: OipModel) -> RequestInput:
    if len(body.inputs) != 1 or body.inputs[0].name != model.input_name:
        names = [i.name for i in body.inputs]
        raise BadRequest(
            f"model {model.name!r} takes one input {model.input_name!r}, not {names}", code="unknown_input"
        )
    item = body.inputs[0]
    if item.datatype != model.input_datatype:
        raise BadRequest(
            f"input {item.name!r} has datatype {model.input_datatype}, not {item.datatype}", code="invalid_datatype"
        )
    return item


def _timeout_s(parameters: dict[str, Any]) -> float | None:
    """The request's `timeout` parameter in microseconds (0 or absent: the server's own timeout)."""
    timeout = parameters.get("timeout")
    if timeout is None or timeout == 0:
        return None
    if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 0:
        raise InvalidParameter(f"parameter timeout must be a whole number of microseconds, not {timeout!r}")
    return timeout / 1_000_000


def _bool_parameter(parameters: dict[str, Any], name: str, default: bool) -> bool:
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise InvalidParameter(f"parameter {name} must be true or false, not {value!r}")
    return value


def _response(body: InferRequestBody, model: OipModel, inference: Inference, outputs: list[_Output]) -> InferResponse:
    rows = {
        LOGITS_OUTPUT: torch.stack([o.logits for o in inference.outputs]).numpy(),  # (n, num_classes) float32
        EMBEDDING_OUTPUT: torch.stack([o.embedding for o in inference.outputs]).numpy(),  # (n, dim) float32
    }
    header: dict[str, Any] = {"model_name": model.name, "model_version": VERSION}
    if body.id is not None:
        header["id"] = body.id
    entries: list[dict[str, Any]] = []
    binary: list[bytes] = []
    for output in outputs:
        array = rows[output.name]
        if output.classification is None:
            datatype, shape = "FP32", list(array.shape)
            values: np.ndarray | list[bytes] = array
        else:
            datatype, shape = "BYTES", [array.shape[0], output.classification]
            values = _classification(array, output.classification, model.labels)
        entry: dict[str, Any] = {"name": output.name, "datatype": datatype, "shape": shape}
        if output.binary:
            data = values.astype("<f4").tobytes() if isinstance(values, np.ndarray) else tensors.pack_bytes(values)
            entry["parameters"] = {"binary_data_size": len(data)}  # the C++ client requires it here
            binary.append(data)
        else:
            entry["data"] = values.ravel() if isinstance(values, np.ndarray) else [v.decode() for v in values]
        entries.append(entry)
    header["outputs"] = entries
    return InferResponse(orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY), binary)


def _classification(logits: np.ndarray, k: int, labels: list[str]) -> list[bytes]:
    """Triton's classification extension: per image the k largest output values as "value:index:label", best
    first (row-major [N, k]). The value is the LOGITS output's own value, as Triton reports it."""
    strings: list[bytes] = []
    for row in logits:
        best = np.argsort(-row, kind="stable")[:k]
        strings.extend(f"{row[i]:f}:{i}:{labels[i]}".encode() for i in best)
    return strings
