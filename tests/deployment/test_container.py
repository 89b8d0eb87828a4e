"""The Dockerfile: hadolint-clean, the runtime stage's contract (non-root, HTTP and gRPC ports, health check, signals,
entry point), a cache-friendly order, a lean build context, and a health check command that really probes /healthz."""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.config.settings import Settings
from tests.support.dockerfile import DOCKERFILE, healthcheck_command, runtime_env, stages
from tests.support.processes import tiny_server_process

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_hadolint_passes_with_no_warnings() -> None:
    result = subprocess.run(
        [BIN / "hadolint", "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    for line in DOCKERFILE.read_text().splitlines():
        if "hadolint ignore" in line:
            assert " -- " in line or "because" in line, f"an ignore needs its reason on the same line: {line}"


def test_the_runtime_stage_runs_vit_serve_as_a_non_root_user_that_sigterm_reaches() -> None:
    runtime = dict(stages()[-1])
    user = runtime["USER"].split(":")[0]
    arg_uid = next(args for name, args in stages()[-1] if name == "ARG" and args.startswith("UID="))
    uid = int(arg_uid.split("=")[1]) if user == "${UID}" else int(user)
    assert uid >= 1000
    env = runtime_env()
    assert runtime["EXPOSE"].split() == [env["VIT_PORT"], env["VIT_GRPC_PORT"]]  # HTTP, then gRPC
    assert int(env["VIT_GRPC_PORT"]) == Settings.model_fields["grpc_port"].default
    assert runtime["STOPSIGNAL"] == "SIGTERM"
    assert json.loads(runtime["ENTRYPOINT"]) == ["vit-serve"]  # exec form: no shell in between to eat signals
    assert json.loads(runtime["CMD"]) == ["serve"]
    assert healthcheck_command()[0] == "python"  # slim images have no curl


def test_the_build_is_multi_stage_and_installs_dependencies_before_the_source() -> None:
    all_stages = stages()
    assert len(all_stages) >= 2
    assert [args for name, args in all_stages[0] if name == "COPY"] == ["pyproject.toml ./"]  # deps only
    copies_from = [args for name, args in all_stages[-1] if name == "COPY" and args.startswith("--from")]
    assert any("/opt/venv" in args for args in copies_from)
    weights = next(stage for stage in all_stages if stage[0][1].endswith("AS weights"))
    assert any(name == "ARG" and args.startswith("BAKE_WEIGHTS=") for name, args in weights)
    assert any(name == "RUN" and "vit-serve download" in args for name, args in weights)


def in_build_context(path: str) -> bool:
    """Whether Docker sends `path` (relative to the repository) with the build context, per .dockerignore."""
    included = True
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        rule = raw.strip()
        if not rule or rule.startswith("#"):
            continue
        negated = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/").removeprefix("**/")
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(Path(p).name, pattern) for p in prefixes):
            included = negated
    return included


def test_the_build_context_has_what_the_image_copies_and_nothing_else() -> None:
    copied = [
        args.split()[0]
        for stage in stages()
        for name, args in stage
        if name == "COPY" and not args.startswith("--from")
    ]
    assert set(copied) == {"pyproject.toml", "README.md", "app", "clients/python/vit_serve_client", "models"}
    for path in (
        "pyproject.toml",
        "README.md",
        "app/engine/facade.py",
        "clients/python/vit_serve_client/predict.py",
        "models/vit_b_16/model.toml",
    ):
        assert in_build_context(path), path
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_api.py",
        "bench/perf_analyzer.sh",
        "app/__pycache__/x.pyc",
        "clients/python/vit_serve_client/__pycache__/x.pyc",
    ):
        assert not in_build_context(path), path


@pytest.mark.slow
def test_the_health_check_command_probes_the_service(tmp_path: Path) -> None:
    command = [str(BIN / "python"), *healthcheck_command()[1:]]
    with tiny_server_process(tmp_path) as url:
        env = {**os.environ, "VIT_PORT": url.rsplit(":", 1)[1]}
        assert subprocess.run(command, env=env, capture_output=True, check=False).returncode == 0
    refused = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    assert refused.returncode == 1 and "Connection refused" in refused.stderr
