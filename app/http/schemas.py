"""Request and response shapes, as pydantic models: they validate JSON bodies and document the API at /docs."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.engine.descriptions import ModelInfo
from app.engine.facade import DEFAULT_TOP_K
from app.pipeline.postprocess import ClassScore


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
    logits: bool = Field(True, description="Include the raw logits (default true).")


class EmbedOptions(_Options):
    normalize: bool = Field(False, description="Scale each embedding to unit L2 norm (default false).")
    encoding_format: Literal["float", "base64"] = Field(
        "float",
        description="float (default): JSON numbers; base64: each embedding as one string, base64 of little-endian "
        "float32.",
    )


class ExplainOptions(_Options):
    top_k: TopK = None
    overlay: bool = Field(
        False,
        description="Add a PNG of the attention map laid over the image the model saw (default false); with one "
        "image and Accept: image/png, the answer is that PNG.",
    )


class ClassifyJSON(ImagesJSON, ClassifyOptions):
    """An `application/json` classify body."""

    model_config = ConfigDict(extra="forbid")


class EmbedJSON(ImagesJSON, EmbedOptions):
    """An `application/json` embed body."""

    model_config = ConfigDict(extra="forbid")


class ExplainJSON(ImagesJSON, ExplainOptions):
    """An `application/json` explain body."""

    model_config = ConfigDict(extra="forbid")


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


class ModelList(BaseModel):
    default: str
    models: list[ModelInfo]


class Liveness(BaseModel):
    status: str = Field(examples=["alive"])


class Readiness(BaseModel):
    ready: bool
    models: dict[str, bool]


def image_body_doc(body: type[ImagesJSON]) -> dict[str, Any]:
    """The OpenAPI query parameters and request body of an image endpoint whose JSON body (images and options) is
    `body`: each option is a query parameter as well, and the body's value wins (`bodies.read_images`)."""
    options = {name: schema for name, schema in body.model_json_schema()["properties"].items() if name != "images"}
    return {
        "parameters": [
            {
                "name": name,
                "in": "query",
                "required": False,
                "description": schema.get("description", ""),
                "schema": _query_schema(schema),
            }
            for name, schema in options.items()
        ],
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
        },
    }


def _query_schema(option: dict[str, Any]) -> dict[str, Any]:
    """An option's JSON schema as a query parameter's: a query string cannot say null, so an optional option (null:
    the model's default, told in its description) is documented as its one other type."""
    schema = dict(option)
    kinds = [kind for kind in schema.pop("anyOf", []) if kind != {"type": "null"}]
    if len(kinds) == 1:
        schema.update(kinds[0])
    elif kinds:
        schema["anyOf"] = kinds
    if "default" in schema and schema["default"] is None:
        del schema["default"]
    return schema


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
