"""OIP over REST: the inference request's JSON and binary body, read into the protocol's request
(`app.protocols.oip.inference`), and its outputs written back as JSON, or JSON followed by binary data.

`parse_request` does all the work that grows with the body (JSON, the tensor data, BYTES and base64), and none that
grows past the limits: the declared shape is checked against `max_images` and the model's input before any element
is read. It is plain and synchronous, so the HTTP layer can run it on a thread."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from app.errors import BadRequest, InvalidParameter, describe_validation_error
from app.protocols.json_bounds import check_json_bounds, parse_json
from app.protocols.oip import tensors
from app.protocols.oip.inference import (
    MAX_TENSORS,
    InferRequest,
    OutputSpec,
    OutputTensor,
    TensorSpec,
    checked_batch,
    read_binary,
    requested_outputs,
    the_input,
    timeout_s,
)
from app.protocols.oip.models import VERSION, OipModel


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
    spec = the_input([TensorSpec(i.name, i.datatype, i.shape) for i in parsed.inputs], model)
    chunk = binary.get(spec.name)
    if chunk is not None:
        data = read_binary(spec, chunk, model, max_images=max_images)
    else:
        data = _read_json(spec, parsed.inputs[0].data, model, max_images)
    asked = None if parsed.outputs is None else [OutputSpec(o.name, o.parameters) for o in parsed.outputs]
    outputs = requested_outputs(asked, parsed.parameters, model)
    return InferRequest(data, outputs, timeout_s(parsed.parameters), parsed.id)


def encode_response(request: InferRequest, model: OipModel, outputs: list[OutputTensor]) -> InferResponse:
    """The JSON object, and after it the data of the outputs asked for in binary."""
    header: dict[str, Any] = {"model_name": model.name, "model_version": VERSION}
    if request.id is not None:
        header["id"] = request.id
    entries: list[dict[str, Any]] = []
    binary: list[bytes] = []
    for output in outputs:
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": output.shape}
        if output.binary:
            data = output.raw()
            entry["parameters"] = {"binary_data_size": len(data)}  # the C++ client requires it here
            binary.append(data)
        elif isinstance(output.values, np.ndarray):
            entry["data"] = output.values.ravel()
        else:
            entry["data"] = [v.decode() for v in output.values]
        entries.append(entry)
    header["outputs"] = entries
    return InferResponse(orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY), binary)


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


def _read_json(spec: TensorSpec, data: Any, model: OipModel, max_images: int) -> np.ndarray | list[bytes]:
    """The input's data as JSON: numbers, or BYTES as base64 strings; flat or nested row-major."""
    count = checked_batch(spec, model, max_images)
    if model.takes_pixels:
        return tensors.fp32_from_json(data, spec.shape, spec.name)
    return tensors.bytes_from_json(data, spec.name, count=count)


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
    spec = TensorSpec(model.input_name, model.input_datatype, shape)
    data = read_binary(spec, memoryview(body), model, max_images=max_images)
    return InferRequest(data, requested_outputs(None, {"binary_data_output": True}, model), timeout_s=None)
