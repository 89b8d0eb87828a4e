"""The `vit-serve` command: flags and VIT_* variables into one Settings; start-up failures as one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config.settings import Settings
from app.serve import cli


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    """Replace the server start with a recorder of the settings it would have been given."""
    seen: list[Settings] = []
    monkeypatch.setattr(cli, "serve", seen.append)
    return seen


def test_flags_become_settings(captured: list[Settings]) -> None:
    cli.main(["serve", "--model", "a,b", "--model", "c", "--max-batch-size", "3", "--port", "9001", "--dtype", "bf16"])
    (settings,) = captured
    assert settings.model == ["a", "b", "c"] and settings.default_model == "a"
    assert settings.max_batch_size == 3 and settings.port == 9001 and settings.dtype == "bf16"
    assert settings.batching().max_batch_size == 3


def test_environment_variables_become_settings_and_flags_win(
    captured: list[Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VIT_MODEL", "x, y")
    monkeypatch.setenv("VIT_MAX_QUEUE_DELAY_MS", "12.5")
    monkeypatch.setenv("VIT_WEIGHTS", "random")
    monkeypatch.setenv("VIT_PORT", "7000")
    cli.main(["serve", "--port", "7001"])
    (settings,) = captured
    assert settings.model == ["x", "y"]
    assert settings.max_queue_delay_ms == 12.5 and settings.weights == "random"
    assert settings.port == 7001


def test_defaults_serve_vit_b_16_from_models(captured: list[Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("VIT_MODEL", "VIT_PORT", "VIT_WEIGHTS"):
        monkeypatch.delenv(name, raising=False)
    cli.main(["serve"])
    (settings,) = captured
    assert settings.model == ["vit_b_16"] and settings.model_repository == Path("models")
    assert (settings.host, settings.port, settings.device, settings.dtype) == ("0.0.0.0", 8000, "auto", "auto")


def test_an_invalid_setting_exits_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["serve", "--max-batch-size", "0"])
    assert caught.value.code == "vit-serve: invalid setting: serve.max_batch_size: Input should be greater than 0"


def test_a_model_that_cannot_load_exits_with_one_line_and_serves_nothing(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["serve", "--model-repository", str(tmp_path), "--model", "nothing"])
    message = str(caught.value.code)
    assert message.startswith("vit-serve: model 'nothing': no ") and "\n" not in message


def test_help_lists_the_command_and_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["serve", "--help"])
    assert caught.value.code == 0
    text = capsys.readouterr().out
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in text


def test_serve_help_shows_each_default_as_a_value_and_each_environment_variable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["serve", "--help"])
    assert caught.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # as one line: argparse wraps help at the terminal's width
    assert "(default: vit_b_16) [env: VIT_MODEL]" in text
    assert "--max-queue-size N" in text and "(default: 256) [env: VIT_MAX_QUEUE_SIZE]" in text
    assert "(default: off) [env: VIT_COMPILE]" in text
    for artefact in ("default factory", "<lambda>", "null", "list[str]"):
        assert artefact not in text
    for name in Settings.model_fields:
        assert f"[env: VIT_{name.upper()}]" in text
