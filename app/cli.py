"""The `vit-serve` command. Settings are read here, once, from flags and `VIT_*` variables, then passed down."""

from __future__ import annotations

import sys
from pathlib import Path

import uvicorn
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, CliApp, CliPositionalArg, CliSubCommand, SettingsConfigDict

from app.api.app import create_app
from app.engine import Engine
from app.errors import ModelLoadError, describe_validation_error
from app.loading import download_pretrained
from app.logs import configure_logging
from app.model_config import load_model_config
from app.server import Server
from app.settings import DEFAULT_MODEL, ModelNames, ModelRepository, Settings, WeightsCacheDir


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

    def cli_cmd(self) -> None:
        CliApp.run_subcommand(self)


def serve(settings: Settings) -> None:
    configure_logging(settings.log_level, settings.log_format)
    engine = Engine.load(settings)
    config = uvicorn.Config(
        create_app(settings, engine),
        host=settings.host,
        port=settings.port,
        log_config=None,  # configured above: one format for every logger
        access_log=False,  # the telemetry middleware writes one richer line per request
        timeout_graceful_shutdown=None,  # the server's own watchdog bounds the whole drain
        server_header=False,
    )
    Server(config, engine=engine, drain_timeout_s=settings.drain_timeout_s).run()


def download(command: Download) -> None:
    for name in command.model:
        config = load_model_config(command.model_repository, name)
        path = download_pretrained(config, command.weights_cache_dir)
        if path is None:
            print(f"{name}: weights {config.weights!r} need no download")
        else:
            print(f"{name}: {config.arch}.{config.weights} in {path}")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    try:
        CliApp.run(VitServe, cli_args=args)
    except ValidationError as exc:
        sys.exit(f"vit-serve: invalid setting: {describe_validation_error(exc)}")
    except ModelLoadError as exc:
        sys.exit(f"vit-serve: {exc}")


if __name__ == "__main__":
    main()
