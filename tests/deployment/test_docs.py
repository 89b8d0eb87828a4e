"""The documentation site builds with `mkdocs build --strict` (no broken link or anchor), and its reference pages
name every setting, CLI flag, metric, error code and endpoint the code has.

What the code has is read here independently of the generator (docs/hooks/), so a generator that skips something
fails this test.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.config.settings import Settings
from app.http.app import create_app
from app.observability.worker_metrics import CUDA_MEMORY
from app.serve.cli import main
from tests.support.fakes import fake_engine

REPO = Path(__file__).resolve().parents[2]
MKDOCS = Path(sys.executable).with_name("mkdocs")

pytestmark = pytest.mark.slow  # imports torch and builds the whole site: several seconds


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    command = [str(MKDOCS) if MKDOCS.exists() else shutil.which("mkdocs") or "mkdocs", "build", "--strict"]
    result = subprocess.run(
        [*command, "--site-dir", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def page_text(site: Path, page: str) -> str:
    """A built page's text, tags dropped and entities decoded, as a reader sees it."""
    raw = (site / page / "index.html").read_text(encoding="utf-8")
    return html.unescape(re.sub(r"<[^>]+>", " ", raw))


def test_every_setting_is_in_the_settings_reference(site: Path) -> None:
    text = page_text(site, "reference/settings")
    missing = [
        name
        for name in Settings.model_fields
        if f"--{name.replace('_', '-')}" not in text or f"VIT_{name.upper()}" not in text
    ]
    assert not missing, f"settings missing from the reference: {missing}"


def test_every_cli_flag_is_in_the_cli_reference(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = page_text(site, "reference/cli")
    for subcommand in ("serve", "download", "predict", "batch"):
        with pytest.raises(SystemExit):
            main([subcommand, "--help"])
        flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", capsys.readouterr().out)) - {"--help"}
        assert flags, f"no flags in `vit-serve {subcommand} --help`"
        missing = sorted(flag for flag in flags if flag not in text)
        assert not missing, f"`vit-serve {subcommand}` flags missing from the reference: {missing}"


async def test_every_metric_is_in_the_metrics_reference(site: Path, client: httpx.AsyncClient) -> None:
    await client.post("/v1/classify", content=b"x", headers={"Content-Type": "image/png"})
    exposition = (await client.get("/metrics")).text
    names = {family.name for family in text_string_to_metric_families(exposition)} | set(CUDA_MEMORY)
    text = page_text(site, "reference/metrics")
    missing = sorted(name for name in names if not re.search(rf"\b{name}(_total|_bucket)?\b", text))
    assert not missing, f"metrics missing from the reference: {missing}"


def error_codes_in_source() -> set[str]:
    """Every machine code the app's source can answer: class attributes and `code="..."` arguments, `"code": "..."`
    in bodies, `{404: "not_found"}` tables, and `error_response(401, ..., "unauthorized")` calls."""
    patterns = [
        r"""\bcode\s*[:=]\s*(?:str\s*=\s*)?["']([a-z_]+)["']""",
        r"""["']code["']\s*:\s*["']([a-z_]+)["']""",
        r"""\b[45]\d\d\s*:\s*["']([a-z_]+)["']""",
        r"""\b[45]\d\d\s*,[^()]*?,\s*["']([a-z_]+)["']\s*\)""",
    ]
    codes: set[str] = set()
    for path in (REPO / "app").rglob("*.py"):
        source = path.read_text(encoding="utf-8")
        for pattern in patterns:
            codes.update(re.findall(pattern, source))
    return codes


def test_every_error_code_is_in_the_errors_reference(site: Path) -> None:
    codes = error_codes_in_source()
    assert {"invalid_image", "queue_full", "unauthorized", "not_found", "too_many_images"} <= codes
    text = page_text(site, "reference/errors")
    missing = sorted(code for code in codes if not re.search(rf"\b{code}\b", text))
    assert not missing, f"error codes missing from the reference: {missing}"


def test_every_operation_is_in_the_http_reference(site: Path) -> None:
    document = json.loads((site / "reference" / "openapi.json").read_text(encoding="utf-8"))
    text = page_text(site, "reference/http-api")
    operations = [
        f"{method.upper()} {path}"
        for path, item in document["paths"].items()
        for method in item
        if method in {"get", "post", "put", "delete", "patch"}
    ]
    assert "POST /v1/classify" in operations
    missing = [operation for operation in operations if operation not in text]
    assert not missing, f"operations missing from the HTTP reference: {missing}"


def test_the_published_openapi_document_is_the_apps(site: Path) -> None:
    """The site's openapi.json has every operation of the app's own document (here around the fake engine)."""
    published = json.loads((site / "reference" / "openapi.json").read_text(encoding="utf-8"))
    served = create_app(Settings(), fake_engine()).openapi()
    assert {path: set(item) for path, item in published["paths"].items()} == {
        path: set(item) for path, item in served["paths"].items()
    }
