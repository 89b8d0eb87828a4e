"""The protocol's requests and answers as `inference.*` protobuf messages: a `ModelInferRequest` read into the
protocol's request (`app.protocols.oip.inference`, the same checks and readers as REST's), its outputs written as a
`ModelInferResponse`, and the model descriptions REST answers as JSON, field for field."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format

from app.errors import BadRequest
from app.grpc.proto import inference_pb2 as pb
from app.protocols.oip.inference import (
    MAX_TENSORS,
    InferRequest,
    OutputSpec,
    OutputTensor,
    TensorSpec,
    read_binary,
    read_values,
    requested_outputs,
    the_input,
    timeout_s,
)
from app.protocols.oip.models import VERSION, OipModel

MAX_DIMS = 8  # of an input's shape, as REST allows


def infer_request(message: pb.ModelInferRequest, model: OipModel, *, max_images: int) -> InferRequest:
    """The request's one input from `raw_input_contents` (the binary layout) or its typed `contents`; the outputs
    asked for; its `id` and `timeout` parameter. Counts are bounded before anything is copied out of the message."""
    _check_counts(message)
    spec = the_input([TensorSpec(i.name, i.datatype, list(i.shape)) for i in message.inputs], model)
    if message.raw_input_contents:
        if len(message.raw_input_contents) != len(message.inputs):
            raise BadRequest(
                f"raw_input_contents holds {len(message.raw_input_contents)} entries for {len(message.inputs)} inputs",
                code="invalid_tensor",
            )
        data = read_binary(spec, message.raw_input_contents[0], model, max_images=max_images)
    else:
        contents = message.inputs[0].contents
        values = contents.fp32_contents if model.takes_pixels else contents.bytes_contents
        data = read_values(spec, values, model, max_images=max_images)
    asked = [OutputSpec(o.name, parameters(o.parameters)) for o in message.outputs] or None
    request_parameters = parameters(message.parameters)
    outputs = requested_outputs(asked, request_parameters, model)
    return InferRequest(data, outputs, timeout_s(request_parameters), message.id or None)


def payload_bytes(message: pb.ModelInferRequest) -> int:
    """About how many bytes of tensor data a request holds (what reading it costs)."""
    raw = sum(len(r) for r in message.raw_input_contents)
    typed = sum(4 * len(i.contents.fp32_contents) + sum(map(len, i.contents.bytes_contents)) for i in message.inputs)
    return raw + typed


def infer_response(request: InferRequest, model: OipModel, outputs: list[OutputTensor]) -> pb.ModelInferResponse:
    """Every output raw, in `raw_output_contents` (what tritonclient.grpc reads): FP32 little-endian, BYTES each a
    4-byte little-endian length and its bytes."""
    response = pb.ModelInferResponse(model_name=model.name, model_version=VERSION, id=request.id or "")
    for output in outputs:
        response.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
        response.raw_output_contents.append(output.raw())
    return response


def parameters(message: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    """The InferParameter oneofs as plain values (an empty one is left out, as if absent)."""
    plain: dict[str, Any] = {}
    for name, parameter in message.items():
        choice = parameter.WhichOneof("parameter_choice")
        if choice is not None:
            plain[name] = getattr(parameter, choice)
    return plain


def server_metadata(metadata: dict[str, Any]) -> pb.ServerMetadataResponse:
    return json_format.ParseDict(metadata, pb.ServerMetadataResponse())


def model_metadata(model: OipModel) -> pb.ModelMetadataResponse:
    """REST's model metadata, field for field."""
    return json_format.ParseDict(model.metadata(), pb.ModelMetadataResponse())


def model_config(model: OipModel, *, max_request_batch: int) -> pb.ModelConfigResponse:
    """REST's model configuration (Triton's), field for field."""
    config = json_format.ParseDict(model.config(max_request_batch), pb.ModelConfig())
    return pb.ModelConfigResponse(config=config)


def _check_counts(message: pb.ModelInferRequest) -> None:
    """Inputs, outputs and dimensions within REST's bounds, before any is read."""
    for what, count in (("inputs", len(message.inputs)), ("outputs", len(message.outputs))):
        if count > MAX_TENSORS:
            raise BadRequest(f"{count} {what} in one request; the most is {MAX_TENSORS}", code="invalid_body")
    for tensor in message.inputs:
        if len(tensor.shape) > MAX_DIMS:
            raise BadRequest(
                f"input {tensor.name!r}: a shape of {len(tensor.shape)} dimensions; the most is {MAX_DIMS}",
                code="invalid_shape",
            )
