"""The `vit-serve` command. Settings are read here, once, from flags and `VIT_*` variables, then passed down.

The serving stack (torch, the engine, uvicorn) is imported by the subcommands that need it, so that `vit-serve
predict` and `--help` start at once.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from pydantic import Field, PositiveFloat, PositiveInt, SecretStr, ValidationError
from pydantic_settings import BaseSettings, CliApp, CliPositionalArg, CliSubCommand, SettingsConfigDict

from app.client.http import DEFAULT_URL
from app.config.settings import DEFAULT_MODEL, ModelNames, ModelRepository, Settings, WeightsCacheDir
from app.errors import ModelLoadError, describe_validation_error


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


class Predict(BaseSettings):
    """Classify every image under PATHs through a running server: one line per image (JSON Lines, or CSV for a .csv
    output) as it goes, a progress bar, a summary; exit status 1 if any image failed."""

    model_config = SettingsConfigDict(env_prefix="VIT_CLIENT_", extra="ignore")

    paths: CliPositionalArg[list[Path]] = Field(description="Image files and folders (walked for image files).")
    url: str = Field(DEFAULT_URL, description="The server.")
    model: str | None = Field(None, description="A served model (default: the server's default).")
    top_k: PositiveInt = Field(5, description="Classes per image.")
    concurrency: PositiveInt = Field(4, description="Requests in flight at once.")
    batch: PositiveInt = Field(8, description="Images per request.")
    output: Path | None = Field(None, description="Where lines go: .jsonl or .csv (default: JSON Lines on stdout).")
    resume: bool = Field(False, description="Skip images the output already holds without an error; append.")
    api_key: SecretStr | None = Field(None, description="Sent as Authorization: Bearer <key>.")
    timeout_s: PositiveFloat = Field(60.0, description="Per request.")
    attempts: PositiveInt = Field(5, description="Tries per request, in all, on 503/429 and connection errors.")
    progress: bool = Field(True, description="A progress bar on stderr (with images/s and ETA).")

    def cli_cmd(self) -> None:
        sys.exit(predict(self))


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
    from app.config.model_config import load_model_config
    from app.sources.loading import download_pretrained

    for name in command.model:
        config = load_model_config(command.model_repository, name)
        path = download_pretrained(config, command.weights_cache_dir)
        if path is None:
            print(f"{name}: weights {config.weights!r} need no download")
        else:
            print(f"{name}: {config.arch}.{config.weights} in {path}")


def predict(command: Predict) -> int:
    """The exit status: 0 when every image was classified, 1 when any failed, 2 when the run could not start."""
    from app.client.predict import CsvWriter, JsonLinesWriter, Options, done_before
    from app.client.predict import predict as run

    output = command.output
    if output is not None and output.exists() and not command.resume:
        print(f"vit-serve predict: {output} exists; add --resume to go on from it, or remove it", file=sys.stderr)
        return 2
    skip = done_before(output) if output is not None and command.resume else set()
    options = Options(
        url=command.url,
        model=command.model,
        top_k=command.top_k,
        concurrency=command.concurrency,
        batch=command.batch,
        api_key=command.api_key.get_secret_value() if command.api_key else None,
        timeout_s=command.timeout_s,
        attempts=command.attempts,
        progress=command.progress,
    )
    stream = sys.stdout if output is None else output.open("a", newline="", encoding="utf-8")
    try:
        is_csv = output is not None and output.suffix == ".csv"
        writer = CsvWriter(stream, header=stream.tell() == 0) if is_csv else JsonLinesWriter(stream)
        summary = asyncio.run(run(command.paths, writer, options, skip=skip))
    finally:
        if stream is not sys.stdout:
            stream.close()
    print(summary.text(), file=sys.stderr)
    return 1 if summary.failed else 0


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
