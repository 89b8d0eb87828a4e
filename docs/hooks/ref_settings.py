"""The settings reference: one row per field of `Settings`, with its flag, variable, type, default and meaning."""

from __future__ import annotations

import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from ref_text import cell, code, table


def markdown() -> str:
    from app.config.settings import Settings

    return fields_table(Settings, env_prefix=Settings.model_config.get("env_prefix", ""))


def fields_table(model: type[BaseModel], *, env_prefix: str, skip: tuple[str, ...] = ()) -> str:
    rows = []
    for name, field in model.model_fields.items():
        if name in skip or is_subcommand(field):
            continue
        flag = name.upper() if is_positional(field) else f"--{name.replace('_', '-')}"
        if field.annotation is bool:
            flag += f", --no-{name.replace('_', '-')}"
        env = f"{env_prefix}{name}".upper()
        rows.append([code(flag), code(env), type_name(field.annotation), default(field), meaning(field)])
    return table(["flag", "environment", "type", "default", "meaning"], rows)


def is_positional(field: FieldInfo) -> bool:
    return any(getattr(m, "__name__", type(m).__name__) == "_CliPositionalArg" for m in field.metadata)


def is_subcommand(field: FieldInfo) -> bool:
    return any(getattr(m, "__name__", type(m).__name__) == "_CliSubCommand" for m in field.metadata)


def type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is typing.Literal:
        return " \\| ".join(code(str(a)) for a in args)
    if origin in (typing.Union, types.UnionType):
        real = [a for a in args if a is not type(None)]
        optional = len(real) < len(args)
        return " or ".join(type_name(a) for a in real) + (", optional" if optional else "")
    if origin in (list, tuple, set):
        return f"list of {type_name(args[0])}" if args else "list"
    if isinstance(annotation, type):
        if issubclass(annotation, Enum):
            return " \\| ".join(code(str(m.value)) for m in annotation)
        names = {bool: "boolean", int: "integer", float: "number", str: "string", SecretStr: "secret string"}
        if issubclass(annotation, Path):
            return "path"
        return names.get(annotation, annotation.__name__)
    return cell(str(annotation))


def default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "(required)"
    else:
        value = field.default
    if value is None or value == []:
        return "(not set)"
    if isinstance(value, list):
        return code(",".join(str(v) for v in value))
    if isinstance(value, bool):
        return code(str(value).lower())
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1 << 20:
        return f"{code(str(value))} ({value:,})"
    return code(str(value))


def meaning(field: FieldInfo) -> str:
    text = cell(field.description or "")
    bounds = [
        f"{symbol} {getattr(m, attr)}"
        for m in field.metadata
        for attr, symbol in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤"))
        if getattr(m, attr, None) is not None
    ]
    return f"{text} ({', '.join(bounds)})" if bounds else text
