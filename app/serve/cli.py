"""The `vit-serve` command. Settings are read here, once, from flags and `VIT_*` variables, then passed down.

The serving stack (torch, the engine, uvicorn) is imported by the subcommands that need it, so that `vit-serve
predict` and `--help` start at once.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from types import FrameType

from pydantic import BaseModel, Field, ValidationError
from pydantic_settings import BaseSettings, CliApp, CliPositionalArg, CliSubCommand, SettingsConfigDict

from app.config.settings import DEFAULT_MODEL, ModelNames, ModelRepository, Settings, WeightsCacheDir
from app.errors import ModelLoadError, describe_validation_error
from app.serve.cli_help import HandWrittenHelp


class Serve(Settings):
    """Load the models and serve them over HTTP until SIGINT/SIGTERM, then drain."""

    def cli_cmd(self) -> None:
        serve(self)


class Download(BaseSettings):
    """Fetch the pretrained weights of MODELs into the weights cache, then exit (at image build time)."""

    model_config = SettingsConfigDict(env_prefix="VIT_", extra="ignore")

    model: CliPositionalArg[ModelNames] = Field(
        default_factory=lambda: [DEFAULT_MODEL], description="Models whose weights to fetch (default: vit_b_16)."
    )
    model_repository: ModelRepository = Path("models")
    weights_cache_dir: WeightsCacheDir = None

    def cli_cmd(self) -> None:
        download(self)


# `predict` is the client's command (vit-serve-client, which this package includes): `main` hands it over, with its
# own parser. This model only lists it here.
class Predict(BaseModel):
    """Classify every image under PATHs through a running server: one line per image (JSON Lines, or CSV for a .csv
    output) as it goes, a progress bar, a summary. `vit-serve predict --help` lists its options, each also an
    environment variable VIT_CLIENT_<NAME>."""


class VitServe(BaseSettings):
    """Vision Transformer image classification over HTTP. Every flag is also an environment variable VIT_<NAME>."""

    model_config = SettingsConfigDict(
        cli_prog_name="vit-serve",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_use_class_docs_for_groups=True,
        env_prefix="VIT_CLI_",
    )

    serve: CliSubCommand[Serve]
    download: CliSubCommand[Download]
    predict: CliSubCommand[Predict]

    def cli_cmd(self) -> None:
        CliApp.run_subcommand(self)


def serve(settings: Settings) -> None:
    from app.observability.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    if settings.workers > 1:
        from app.serve.workers import supervise

        sys.exit(supervise(settings))
    from app.serve.server import serve as serve_one

    serve_one(settings)


def download(command: Download) -> None:
    from app.sources.registry import download_weights, read_config

    for name in command.model:
        config = read_config(command.model_repository, name)
        path = download_weights(config, command.weights_cache_dir)
        if path is None:
            print(f"{name}: weights {config.weights!r} need no download")
        else:
            print(f"{name}: {config.arch}.{config.weights} in {path}")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["predict"]:
        from vit_serve_client.cli import predict

        sys.exit(predict(args[1:]))
    if args[:1] == ["serve"]:
        # Until the server (or the workers' supervisor) installs its own handler, once the models are loaded, nothing
        # has been accepted: SIGTERM is a clean stop, not a death by signal (a pod deleted while it starts).
        signal.signal(signal.SIGTERM, _stop_before_serving)
    try:
        CliApp.run(VitServe, cli_args=args, cli_settings_source=HandWrittenHelp(VitServe, commands=[Serve, Download]))
    except ValidationError as exc:
        sys.exit(f"vit-serve: invalid setting: {describe_validation_error(exc)}")
    except ModelLoadError as exc:
        sys.exit(f"vit-serve: {exc}")


def _stop_before_serving(signum: int, frame: FrameType | None) -> None:
    print("vit-serve: SIGTERM before serving: stopped", file=sys.stderr)
    raise SystemExit(0)


if __name__ == "__main__":
    main()
