"""The `vit-serve` command. Settings are read here, once, from flags and `VIT_*` variables, then passed down."""

from __future__ import annotations

import sys

import uvicorn
from pydantic import ValidationError
from pydantic_settings import BaseSettings, CliApp, CliSubCommand, SettingsConfigDict

from app.api.app import create_app
from app.engine import Engine
from app.errors import ModelLoadError, describe_validation_error
from app.logs import configure_logging
from app.server import Server
from app.settings import Settings


class Serve(Settings):
    """Load the models and serve them over HTTP until SIGINT/SIGTERM, then drain."""

    def cli_cmd(self) -> None:
        serve(self)


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
