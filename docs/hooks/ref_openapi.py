"""The HTTP API reference: the app's own OpenAPI document, rendered as Markdown (operations by tag, then schemas)."""

from __future__ import annotations

import functools
import re
from typing import Any

import ref_service
from ref_text import cell, code, table

METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


@functools.cache
def document() -> dict[str, Any]:
    """What a running server publishes at `/openapi.json`."""
    return dict(ref_service.app().openapi())


def markdown() -> str:
    doc = document()
    info = doc["info"]
    parts = [f"OpenAPI {doc['openapi']}, `{info['title']}` {info['version']}: {info.get('summary', '')}", ""]
    by_tag: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for path, item in doc["paths"].items():
        for method in METHODS:
            if method in item:
                operation = item[method]
                by_tag.setdefault((operation.get("tags") or ["other"])[0], []).append((method, path, operation))
    for tag, operations in by_tag.items():
        parts += [f"## {tag[0].upper()}{tag[1:]}", ""]
        for method, path, operation in operations:
            parts += _operation(method, path, operation)
    parts += ["## Schemas", ""]
    for name, schema in doc.get("components", {}).get("schemas", {}).items():
        parts += _schema(name, schema)
    return "\n".join(parts)


def _operation(method: str, path: str, operation: dict[str, Any]) -> list[str]:
    anchor = "op-" + re.sub(r"[^a-z0-9]+", "-", f"{method} {path}".lower()).strip("-")
    parts = [f"### `{method.upper()} {path}` {{#{anchor}}}", "", cell(operation.get("summary", "")), ""]
    if operation.get("description"):
        parts += [operation["description"].strip(), ""]
    parameters = operation.get("parameters", [])
    if parameters:
        rows = [
            [
                code(p["name"]),
                p["in"],
                _type(p.get("schema", {})),
                "yes" if p.get("required") else "no",
                cell(p.get("description") or p.get("schema", {}).get("description", "")),
            ]
            for p in parameters
        ]
        parts += ["**Parameters**", "", table(["name", "in", "type", "required", "description"], rows)]
    body = operation.get("requestBody")
    if body:
        parts += ["**Request body**" + (" (required)" if body.get("required") else ""), ""]
        if body.get("description"):
            parts += [cell(body["description"]), ""]
        rows = [[code(media), _type(content.get("schema", {}))] for media, content in body.get("content", {}).items()]
        parts += [table(["content type", "schema"], rows)]
    responses = operation.get("responses", {})
    if responses:
        rows = [
            [code(status), cell(response.get("description", "")), _content_types(response)]
            for status, response in sorted(responses.items())
        ]
        parts += ["**Responses**", "", table(["status", "description", "body"], rows)]
    return parts


def _content_types(response: dict[str, Any]) -> str:
    content = response.get("content", {})
    return "<br>".join(f"{code(media)}: {_type(c.get('schema', {}))}" for media, c in content.items())


def _schema(name: str, schema: dict[str, Any]) -> list[str]:
    parts = [f"### {name} {{#schema-{name.lower()}}}", ""]
    if schema.get("description"):
        parts += [cell(schema["description"]), ""]
    properties = schema.get("properties")
    if properties:
        required = set(schema.get("required", []))
        rows = [
            [code(prop), _type(s), "yes" if prop in required else "no", cell(s.get("description", ""))]
            for prop, s in properties.items()
        ]
        parts += [table(["field", "type", "required", "description"], rows)]
    else:
        parts += [_type(schema), ""]
    return parts


def _type(schema: dict[str, Any]) -> str:
    """A schema in a few words: types, references as links, items of arrays, enums and bounds."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#schema-{name.lower()})"
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            kinds = [_type(s) for s in schema[key]]
            return (" and " if key == "allOf" else " or ").join(k for k in kinds if k)
    if "enum" in schema:
        return " \\| ".join(code(repr(v) if not isinstance(v, str) else v) for v in schema["enum"])
    if "const" in schema:
        return code(schema["const"])
    kind = schema.get("type", "")
    if isinstance(kind, list):
        return " or ".join(kind)
    if kind == "array":
        text = f"array of {_type(schema.get('items', {})) or 'any'}"
    elif kind == "string" and schema.get("format") == "binary":
        text = "binary"
    elif kind == "object" and "properties" in schema:
        fields = ", ".join(f"{code(p)}: {_type(s)}" for p, s in schema["properties"].items())
        text = f"object {{{fields}}}"
    elif kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        text = f"object of {_type(schema['additionalProperties'])}"
    else:
        text = kind + (f" ({schema['format']})" if "format" in schema else "")
    bounds = [
        f"{symbol} {schema[key]}"
        for key, symbol in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<"))
        if key in schema
    ]
    return text + (f" ({', '.join(bounds)})" if bounds else "")
