"""API keys (Bearer, several for rotation, probes open, never logged) and CORS (off unless configured)."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from app.config.settings import Settings
from tests.support.fakes import fake_engine, image_bytes
from tests.support.inprocess import ClientFactory

RED = image_bytes((255, 0, 0))
KEYS = "old-key-0123456789,new-key-9876543210"
PROTECTED = [
    ("POST", "/v1/classify"),
    ("POST", "/v1/models/fake/classify"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/fake"),
    ("GET", "/metrics"),
    ("GET", "/v2"),
    ("GET", "/v2/models/fake"),
    ("GET", "/v2/models/fake/config"),
    ("GET", "/v2/models/fake/ready"),
    ("POST", "/v2/models/fake/infer"),
    ("GET", "/no/such/path"),  # no key: nothing to learn, not even which paths exist
]
OPEN = ["/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/docs", "/openapi.json"]


def keyed(**overrides: object) -> Settings:
    return Settings(drain_timeout_s=5, api_keys=KEYS, **overrides)  # type: ignore[arg-type]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
@pytest.mark.parametrize(
    ("authorization", "challenge"),
    [
        (None, 'Bearer realm="vit-serve"'),
        ("Bearer wrong-key", 'Bearer realm="vit-serve", error="invalid_token"'),
        ("Bearer new-key-98765432", 'Bearer realm="vit-serve", error="invalid_token"'),  # a prefix of a key
        ("Basic bmV3LWtleQ==", 'Bearer realm="vit-serve"'),
        ("Bearer ", 'Bearer realm="vit-serve"'),
    ],
)
async def test_without_a_valid_key_every_endpoint_but_the_probes_is_401(
    serve: ClientFactory, method: str, path: str, authorization: str | None, challenge: str
) -> None:
    headers = {"Content-Type": "image/png"} | ({"Authorization": authorization} if authorization else {})
    async with serve(fake_engine(), keyed()) as client:
        response = await client.request(method, path, content=RED if method == "POST" else None, headers=headers)
        assert response.status_code == 401
        assert response.json()["code"] == "unauthorized"
        assert response.headers["www-authenticate"] == challenge


async def test_every_configured_key_works_so_keys_can_be_rotated(serve: ClientFactory) -> None:
    async with serve(fake_engine(), keyed()) as client:
        for key in KEYS.split(","):
            for scheme in ("Bearer", "bearer"):
                response = await client.post(
                    "/v1/classify",
                    content=RED,
                    headers={"Content-Type": "image/png", "Authorization": f"{scheme} {key}"},
                )
                assert response.status_code == 200
        metrics = await client.get("/metrics", headers={"Authorization": f"Bearer {KEYS.split(',')[0]}"})
        assert 'vit_requests_total{code="401"' not in metrics.text  # no 401 happened here
        assert 'code="200",endpoint="/v1/classify"' in metrics.text


@pytest.mark.parametrize("path", OPEN)
async def test_probes_and_docs_need_no_key(serve: ClientFactory, path: str) -> None:
    async with serve(fake_engine(), keyed()) as client:
        assert (await client.get(path)).status_code == 200


async def test_without_keys_configured_nothing_needs_one(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/classify", content=RED, headers={"Content-Type": "image/png"})
    assert response.status_code == 200


async def test_keys_never_reach_the_logs(serve: ClientFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with serve(fake_engine(), keyed()) as client:
        await client.post("/v1/classify", content=RED, headers={"Authorization": "Bearer new-key-9876543210"})
        await client.post("/v1/classify", content=RED, headers={"Authorization": "Bearer a-wrong-guess"})
    text = caplog.text + "".join(repr(getattr(r, "fields", "")) for r in caplog.records)
    assert "POST /v1/classify 200" in caplog.text and "POST /v1/classify 401" in caplog.text
    assert "new-key" not in text and "old-key" not in text and "a-wrong-guess" not in text
    assert "old-key" not in repr(keyed()) and "new-key" not in str(keyed().model_dump())


def test_keys_from_a_file_add_to_the_others(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# rotated 2026-11\nfile-key-1\n\n  file-key-2  \n")
    settings = Settings(api_keys="env-key", api_keys_file=keys)
    assert [k.get_secret_value() for k in settings.api_keys] == ["env-key", "file-key-1", "file-key-2"]


@pytest.mark.parametrize("bad", ["has space", "tab\there", "bell\x07"])
def test_a_malformed_key_is_refused_at_start(bad: str, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(bad + "\n")
    with pytest.raises(ValidationError, match="printable, with no spaces"):
        Settings(api_keys_file=keys)


def test_a_missing_keys_file_is_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="cannot read api_keys_file"):
        Settings(api_keys_file=tmp_path / "absent")


async def test_cors_is_off_by_default(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/models", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in response.headers


async def test_cors_allows_the_configured_origins_and_preflights_pass_without_a_key(serve: ClientFactory) -> None:
    settings = keyed(cors_origins="https://app.example")
    async with serve(fake_engine(), settings) as client:
        preflight = await client.options(
            "/v1/classify",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        response = await client.post(
            "/v1/classify",
            content=RED,
            headers={
                "Origin": "https://app.example",
                "Content-Type": "image/png",
                "Authorization": "Bearer old-key-0123456789",
            },
        )
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-request-id" in response.headers["access-control-expose-headers"].lower()
        other = await client.options(
            "/v1/classify", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
        )
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
