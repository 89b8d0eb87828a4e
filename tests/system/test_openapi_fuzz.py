"""Schemathesis against the service's own OpenAPI document, over real HTTP: no 500s, every answer as documented."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
import schemathesis.checks as checks
from hypothesis import HealthCheck, given, settings
from schemathesis.core.result import Err, Ok
from schemathesis.errors import InvalidSchema

from app.config.settings import Settings
from app.http.app import create_app
from tests.support.fakes import fake_engine
from tests.support.processes import tiny_server

pytestmark = pytest.mark.slow

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
]
Operation = schemathesis.APIOperation[Any, Any, Any, Any]


def _valid(operation: Ok[Operation] | Err[InvalidSchema]) -> Operation:
    if isinstance(operation, Err):
        raise operation.err()
    return operation.ok()


# The document is the app's own; building it needs no model and no server.
SCHEMA = schemathesis.openapi.from_dict(create_app(Settings(), fake_engine()).openapi())
OPERATIONS = {op.label: op for op in map(_valid, SCHEMA.get_all_operations())}
POSITIVE, NEGATIVE = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
# Negative cases need something schemathesis can make invalid: query parameters. (It cannot negate a free-form path
# string, and the infer body's schema admits raw bytes; those are covered by test_oip.py and test_hostile_input.py.)
CASES = [(label, POSITIVE) for label in OPERATIONS] + [
    (label, NEGATIVE)
    for label, op in OPERATIONS.items()
    if any(p.get("in") == "query" for p in op.definition.raw.get("parameters", []))
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with tiny_server(tmp_path_factory.mktemp("repo")) as (url, _):
        yield url


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{label} {mode.value}" for label, mode in CASES])
def test_every_documented_operation_answers_as_documented(
    server: str, label: str, mode: schemathesis.GenerationMode
) -> None:
    """Positive cases (valid by the schema) must never be a 5xx; negative ones (invalid) must be refused with a 4xx."""

    @given(case=OPERATIONS[label].as_strategy(generation_mode=mode))
    @settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def run(case: schemathesis.Case[Any]) -> None:
        case.call_and_validate(base_url=server, checks=CHECKS)

    run()
