"""Request and response shapes, as pydantic models: they validate JSON bodies and document the API at /docs."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.engine import DEFAULT_TOP_K


class ClassifyJSON(BaseModel):
    """An `application/json` classify body."""

    model_config = ConfigDict(extra="forbid")

    images: list[str] = Field(
        description="Encoded images, each as base64 or a data: URI (data:image/jpeg;base64,...).",
        examples=[["data:image/png;base64,iVBORw0KGgo..."]],
    )
    top_k: int | None = Field(None, ge=1, description=f"Classes per image, best first (default {DEFAULT_TOP_K}).")
    logits: bool | None = Field(None, description="Include the raw logits (default true).")


class ClassScore(BaseModel):
    index: int = Field(examples=[281])
    label: str = Field(examples=["tabby"])
    score: float = Field(description="Softmax probability.", examples=[0.91])


class Prediction(BaseModel):
    top_k: list[ClassScore]
    logits: list[float] | None = Field(None, description="Raw logits, one per class; omitted with logits=false.")


class ClassifyResponse(BaseModel):
    model: str = Field(examples=["vit_b_16"])
    predictions: list[Prediction] = Field(description="One per image, in request order.")


class ErrorResponse(BaseModel):
    error: str = Field(description="What went wrong, for a person.")
    code: str = Field(description="What went wrong, for a program.", examples=["invalid_image"])
    index: int | None = Field(None, description="The offending image, where one image is at fault.")


class ModelInfo(BaseModel):
    name: str
    arch: str
    weights: str
    num_params: int
    input_size: list[int]
    num_classes: int
    device: str
    dtype: str
    batching: dict[str, Any]
    preprocess: dict[str, Any]
    acceleration: dict[str, Any] = Field(
        description="How batches run: compile, cuda_graphs, batch_buckets, decode_device, pipeline_depth, "
        "max_images_per_forward."
    )
    ready: bool


class ModelList(BaseModel):
    default: str
    models: list[ModelInfo]


class Liveness(BaseModel):
    status: str = Field(examples=["alive"])


class Readiness(BaseModel):
    ready: bool
    models: dict[str, bool]


IMAGE_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": (
            "One raw image (image/* or application/octet-stream); or multipart/form-data with one or more file "
            "parts (any field names, order kept; optional text fields top_k and logits); or JSON."
        ),
        "content": {
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "top_k": {"type": "integer", "minimum": 1},
                        "logits": {"type": "boolean"},
                    },
                }
            },
            "application/json": {"schema": ClassifyJSON.model_json_schema(ref_template="#/components/schemas/{model}")},
        },
    }
}

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "Malformed body or undecodable image",
        404: "Unknown model",
        413: "Body, image count or pixel count over the limits",
        415: "Unsupported content type or image format",
        422: "Invalid parameters",
        503: "Queue full or not ready (see Retry-After)",
        504: "Deadline passed",
    }.items()
}
