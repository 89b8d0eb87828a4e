"""app/grpc/proto/inference.proto is ours, but the protocol's: every message, field, enum and call it declares must be
what Triton's grpc_service.proto and model_config.proto declare (name, number, type, repeated), so that any client
built from those files (tritonclient.grpc, perf_analyzer, KServe's) talks to this server unchanged.

tritonclient's generated modules and ours both define `inference.*`, which one process cannot hold: theirs are read
in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FileDescriptor

from app.grpc.proto import inference_pb2

pytestmark = pytest.mark.slow  # tritonclient's side runs in a subprocess

DUMP = r"""
import json
from tritonclient.grpc import service_pb2, model_config_pb2

def fields(message):
    out = {}
    for field in message.fields:
        kind = field.message_type or field.enum_type
        out[field.name] = [field.number, field.type, field.is_repeated, kind.full_name if kind else None,
                           field.containing_oneof.name if field.containing_oneof else None]
    return out

def walk(message, into):
    into[message.full_name] = fields(message)
    for nested in message.nested_types:
        walk(nested, into)

messages, enums, methods = {}, {}, {}
for module in (service_pb2, model_config_pb2):
    for message in module.DESCRIPTOR.message_types_by_name.values():
        walk(message, messages)
        for message_enum in message.enum_types:
            enums[message_enum.full_name] = {v.name: v.number for v in message_enum.values}
    for enum in module.DESCRIPTOR.enum_types_by_name.values():
        enums[enum.full_name] = {v.name: v.number for v in enum.values}
for method in service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
    methods[method.name] = [method.input_type.full_name, method.output_type.full_name]
print(json.dumps({"messages": messages, "enums": enums, "methods": methods}))
"""


def triton() -> dict[str, Any]:
    result = subprocess.run([sys.executable, "-c", DUMP], capture_output=True, text=True, check=True, timeout=120)
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def ours(file: FileDescriptor) -> tuple[dict[str, Descriptor], dict[str, EnumDescriptor]]:
    messages: dict[str, Descriptor] = {}
    enums: dict[str, EnumDescriptor] = dict((e.full_name, e) for e in file.enum_types_by_name.values())

    def walk(message: Descriptor) -> None:
        messages[message.full_name] = message
        for nested in message.nested_types:
            walk(nested)
        for enum in message.enum_types:
            enums[enum.full_name] = enum

    for message in file.message_types_by_name.values():
        walk(message)
    return messages, enums


def test_every_declared_field_enum_and_call_is_the_protocols() -> None:
    reference = triton()
    messages, enums = ours(inference_pb2.DESCRIPTOR)
    assert inference_pb2.DESCRIPTOR.package == "inference"
    checked = 0
    for name, message in messages.items():
        if message.GetOptions().map_entry:
            continue  # a map's entry type: its key and value are checked as the map field's
        assert name in reference["messages"], f"{name} is not a message of the protocol"
        theirs = reference["messages"][name]
        for field in message.fields:
            kind = field.message_type or field.enum_type
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                kind = None  # compared below through the entry's value type
                value = field.message_type.fields_by_name["value"]
                their_entry = reference["messages"][theirs[field.name][3]]
                assert their_entry["value"][3] == (value.message_type or value.enum_type or value).full_name or (
                    value.message_type is None and their_entry["value"][1] == value.type
                ), f"{name}.{field.name}: map value"
            mine = [field.number, field.type, field.is_repeated]
            assert field.name in theirs, f"{name}.{field.name} is not a field of the protocol"
            assert theirs[field.name][:3] == mine, f"{name}.{field.name}: {mine} != {theirs[field.name][:3]}"
            if kind is not None:
                assert theirs[field.name][3] == kind.full_name, f"{name}.{field.name}: type {kind.full_name}"
            oneof = field.containing_oneof.name if field.containing_oneof else None
            assert theirs[field.name][4] == oneof, f"{name}.{field.name}: oneof {oneof}"
            checked += 1
    for name, enum in enums.items():
        assert reference["enums"][name] == {v.name: v.number for v in enum.values}, name
    service = inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in service.methods:
        assert reference["methods"][method.name] == [method.input_type.full_name, method.output_type.full_name]
    assert checked > 80 and len(service.methods) == 10  # the whole file was compared, not an empty walk
