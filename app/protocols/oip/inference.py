"""An OIP inference request: parse it (JSON and binary tensors), run it through the engine, build the response."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.engine.facade import Engine, Inference
from app.errors import BadRequest, InvalidParameter, describe_validation_error
from app.protocols.oip import tensors
from app.protocols.oip.models import EMBEDDING_OUTPUT, LOGITS_OUTPUT, VERSION, OipModel


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")  # other OIP clients add fields (model_name, ...): harmless


class RequestInput(_Lenient):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: Any = None


class RequestOutput(_Lenient):
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferRequestBody(_Lenient):
    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


@dataclass(frozen=True, slots=True)
class InferRequest:
    body: InferRequestBody
    binary: dict[str, memoryview]  # input name -> its binary data, for inputs sent as binary


@dataclass(frozen=True, slots=True)
class InferResponse:
    header: bytes  # the JSON object
    binary: list[bytes]  # binary output data, in output order, after the JSON

    @property
    def is_binary(self) -> bool:
        return bool(self.binary)


def parse_request(body: bytes, header_length: int | None, model: OipModel) -> InferRequest:
    """The JSON object and the binary data after it; `header_length` 0 means the whole body is raw input data."""
    if header_length == 0:
        return _raw_request(body, model)
    if header_length is not None and not 0 < header_length <= len(body):
        raise BadRequest(
            f"Inference-Header-Content-Length is {header_length} but the body has {len(body)} bytes",
            code="invalid_header_length",
        )
    end = len(body) if header_length is None else header_length
    try:
        parsed = InferRequestBody.model_validate(orjson.loads(body[:end]))
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON inference header: {exc}", code="invalid_json") from None
    except ValidationError as exc:
        raise InvalidParameter(
            f"invalid inference request: {describe_validation_error(exc)}", code="invalid_body"
        ) from None
    return InferRequest(parsed, _split_binary(parsed, memoryview(body)[end:]))


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


def _raw_request(body: bytes, model: OipModel) -> InferRequest:
    """Triton's raw binary request: no JSON, the body is the model's one input, every output comes back binary."""
    if model.takes_pixels:
        per_image = 4 * int(np.prod(model.input_dims))
        if not body or len(body) % per_image:
            raise BadRequest(
                f"a raw FP32 body must be a multiple of {per_image} bytes (one image)", code="invalid_tensor"
            )
        shape = [len(body) // per_image, *model.input_dims]
    else:
        count = len(tensors.unpack_bytes(body, model.input_name)) if tensors.is_packed_bytes(body) else 1
        shape = [count, 1]
        if count == 1 and not tensors.is_packed_bytes(body):
            body = tensors.pack_bytes([body])  # one bare encoded image
    item = RequestInput(
        name=model.input_name, shape=shape, datatype=model.input_datatype, parameters={"binary_data_size": len(body)}
    )
    parsed = InferRequestBody(inputs=[item], parameters={"binary_data_output": True})
    return InferRequest(parsed, {item.name: memoryview(body)})


async def run(engine: Engine, model: OipModel, request: InferRequest) -> tuple[Inference, InferResponse]:
    body = request.body
    outputs = _requested_outputs(body, model)
    timeout_s = _timeout_s(body.parameters)
    item = _the_input(body, model)
    binary = request.binary.get(item.name)
    if model.takes_pixels:
        if len(item.shape) != 4:
            raise BadRequest(
                f"input {item.name!r} must have shape [N, 3, H, W], not {item.shape}", code="invalid_shape"
            )
        array = (
            tensors.fp32_from_binary(binary, item.shape, item.name)
            if binary is not None
            else tensors.fp32_from_json(item.data, item.shape, item.name)
        )
        inference = await engine.infer_pixels(torch.from_numpy(array), model=model.served.name, timeout_s=timeout_s)
    else:
        images = (
            tensors.unpack_bytes(binary, item.name)
            if binary is not None
            else tensors.bytes_from_json(item.data, item.name)
        )
        if item.shape not in ([len(images)], [len(images), 1]):
            raise BadRequest(
                f"input {item.name!r}: shape {item.shape} does not match its {len(images)} elements ([N, 1])",
                code="invalid_shape",
            )
        inference = await engine.infer(images, model=model.served.name, timeout_s=timeout_s)
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
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= model.served.num_classes):
            raise InvalidParameter(f"classification must be an integer from 1 to {model.served.num_classes}, not {k!r}")
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
            values = _classification(array, output.classification, model.served.labels)
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
