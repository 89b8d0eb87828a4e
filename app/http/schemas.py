"""Request and response shapes, as pydantic models: they validate JSON bodies and document the API at /docs."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.engine.facade import DEFAULT_TOP_K


class ImagesJSON(BaseModel):
    """An `application/json` image body: the images, and the endpoint's options as further keys."""

    model_config = ConfigDict(extra="allow")

    images: list[str] = Field(
        description="Encoded images, each as base64 or a data: URI (data:image/jpeg;base64,...).",
        examples=[["data:image/png;base64,iVBORw0KGgo..."]],
    )


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


TopK = Annotated[int | None, Field(ge=1, description=f"Classes per image, best first (default {DEFAULT_TOP_K}).")]


class ClassifyOptions(_Options):
    top_k: TopK = None
    logits: bool = Field(True, description="Include the raw logits.")


class EmbedOptions(_Options):
    normalize: bool = Field(False, description="Scale each embedding to unit L2 norm.")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="float: JSON numbers; base64: each embedding as base64 of little-endian float32."
    )


class ExplainOptions(_Options):
    top_k: TopK = None
    overlay: bool = Field(False, description="Add a PNG of the attention map laid over the image the model saw.")


class ClassifyJSON(ImagesJSON, ClassifyOptions):
    """An `application/json` classify body."""

    model_config = ConfigDict(extra="forbid")


class EmbedJSON(ImagesJSON, EmbedOptions):
    """An `application/json` embed body."""

    model_config = ConfigDict(extra="forbid")


class ExplainJSON(ImagesJSON, ExplainOptions):
    """An `application/json` explain body."""

    model_config = ConfigDict(extra="forbid")


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


class EmbedResponse(BaseModel):
    model: str = Field(examples=["vit_b_16"])
    dim: int = Field(description="Floats per embedding (the model's hidden size).", examples=[768])
    normalized: bool
    encoding_format: Literal["float", "base64"]
    embeddings: list[list[float]] | list[str] = Field(
        description="One per image, in request order: floats, or base64 of little-endian float32."
    )


class Explanation(BaseModel):
    top_k: list[ClassScore]
    grid: list[int] = Field(description="[rows, cols] of the patch grid.", examples=[[14, 14]])
    attention: list[list[float]] = Field(
        description="The attention-rollout map over the patches, rows x cols, summing to 1."
    )
    overlay: str | None = Field(
        None, description="With overlay=true: a data:image/png;base64 URI of the map over the image the model saw."
    )


class ExplainResponse(BaseModel):
    model: str = Field(examples=["vit_b_16"])
    explanations: list[Explanation] = Field(description="One per image, in request order.")


class ErrorResponse(BaseModel):
    error: str = Field(description="What went wrong, for a person.")
    code: str = Field(description="What went wrong, for a program.", examples=["invalid_image"])
    index: int | None = Field(None, description="The offending image, where one image is at fault.")


class Measured(BaseModel):
    batch_size: int = Field(description="The largest batch, timed.")
    images_per_s: float = Field(description="Throughput at that batch size.")
    latency_ms_batch1: float = Field(description="One image alone, through the forward.")


class ModelInfo(BaseModel):
    name: str
    arch: str
    weights: str
    num_params: int
    input_size: list[int]
    num_classes: int
    embedding_dim: int = Field(description="Floats per embedding from /embed (0: served without embeddings).")
    explain: bool = Field(description="Whether /explain is served (the model's attention can be read).")
    device: str
    dtype: str
    batching: dict[str, Any]
    preprocess: dict[str, Any]
    acceleration: dict[str, Any] = Field(
        description="How batches run: compile, cuda_graphs, batch_buckets, decode_device, pipeline_depth, "
        "max_images_per_forward."
    )
    measured: Measured | None = Field(
        description="What the warm-up timed on this device (null while warming up): a client sizes its batches and "
        "timeouts by it."
    )
    request_timeout_s: float | None = Field(
        None, description="The deadline of a request to this model, in seconds: past it, 504."
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


def image_body_doc(body: type[ImagesJSON]) -> dict[str, Any]:
    """The OpenAPI request body of an image endpoint whose JSON body (images and options) is `body`."""
    options = {name: schema for name, schema in body.model_json_schema()["properties"].items() if name != "images"}
    return {
        "requestBody": {
            "required": True,
            "description": (
                "One raw image (image/* or application/octet-stream); or multipart/form-data with one or more file "
                f"parts (any field names, order kept; optional text fields {', '.join(options)}); or JSON."
            ),
            "content": {
                "image/*": {"schema": {"type": "string", "format": "binary"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
                            **options,
                        },
                    }
                },
                "application/json": {"schema": body.model_json_schema(ref_template="#/components/schemas/{model}")},
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
