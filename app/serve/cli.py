"""The `vit-serve` command. Settings are read here, once, from flags and `VIT_*` variables, then passed down.

The serving stack (torch, the engine, uvicorn) is imported by the subcommands that need it, so that `vit-serve
predict` and `--help` start at once.
"""

from __future__ import annotations

import functools
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any, Literal

from pydantic import BaseModel, Field, PositiveInt, ValidationError
from pydantic_settings import BaseSettings, CliApp, CliPositionalArg, CliSubCommand, SettingsConfigDict

from app.config.settings import DEFAULT_MODEL, Dtype, ModelNames, ModelRepository, Settings, WeightsCacheDir
from app.errors import ModelLoadError, ServeError, describe_validation_error
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


class Batch(BaseSettings):
    """Classify images without a server, here or on a Ray cluster: a row per image, a progress bar, a summary."""

    model_config = SettingsConfigDict(env_prefix="VIT_BATCH_", extra="ignore")

    inputs: CliPositionalArg[list[str]] = Field(
        description="Folders (walked for images), globs, image files, or Parquet/CSV listings of paths (a 'path' "
        "column); URLs such as s3:// through fsspec, where installed."
    )
    output: Path = Field(description="A folder of Parquet files, or a .jsonl file; each run adds to it.")
    model: str = Field(DEFAULT_MODEL, description="The model (a folder of the model repository).")
    model_repository: ModelRepository = Path("models")
    engine: Literal["local", "ray"] = Field(
        "local", description="local: this process; ray: actors of a Ray cluster (the ray extra)."
    )
    address: str | None = Field(None, description="The Ray cluster (default: a local one, started for the job).")
    concurrency: PositiveInt = Field(1, description="Ray actors, each with its own copy of the model.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per Ray actor.")
    batch_size: PositiveInt = Field(64, description="Images per Ray batch.")
    top_k: PositiveInt | None = Field(None, description="Classes per image (default: 5, or every class for fewer).")
    logits: bool = Field(False, description="Write each image's logits.")
    embeddings: bool = Field(False, description="Write each image's embedding.")
    resume: bool = Field(False, description="Skip the images the output already holds without an error; add to it.")
    progress: bool = Field(True, description="A progress bar on stderr, with images/s and ETA.")
    device: str | None = Field(
        None,
        description="As serve's --device (default: VIT_DEVICE, else auto). The server's other settings "
        "(VIT_MAX_BATCH_SIZE, VIT_DECODE_WORKERS, ...) are read from their variables, as serve reads them.",
    )
    dtype: Dtype | None = Field(None, description="As serve's --dtype (default: VIT_DTYPE, else auto).")
    weights: str | None = Field(None, description="As serve's --weights.")

    def cli_cmd(self) -> None:
        sys.exit(batch(self))


class Verify(Settings):
    """Measure a model's fast path (its backend, precision, dtype, decode) against torch fp32 on IMAGES (default: its
    calibration images, else the built-in photographs): the accuracy gate's table; status 1 below its bounds."""

    target: CliPositionalArg[str] = Field(description="The model (a folder of the model repository).")
    images: CliPositionalArg[list[Path]] = Field(
        default_factory=list, description="Image files, or folders walked for images (as predict does), to compare on."
    )

    def cli_cmd(self) -> None:
        sys.exit(verify(self))


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
    batch: CliSubCommand[Batch]
    verify: CliSubCommand[Verify]

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


def batch(command: Batch) -> int:
    """`vit-serve batch`; the exit status: 0 when every image was classified, 1 when any failed, 2 when the job could
    not start."""
    from app.batch.extras import MissingExtra
    from app.batch.job import Job, JobError, run

    given: dict[str, Any] = {"device": command.device, "dtype": command.dtype, "weights": command.weights}
    settings = Settings(
        model=[command.model],
        model_repository=command.model_repository,
        **{name: value for name, value in given.items() if value is not None},  # else as VIT_* say
    )
    job = Job(
        inputs=command.inputs,
        output=command.output,
        settings=settings,
        model=command.model,
        engine=command.engine,
        top_k=command.top_k,
        logits=command.logits,
        embedding=command.embeddings,
        resume=command.resume,
        address=command.address,
        concurrency=command.concurrency,
        num_gpus=command.num_gpus,
        batch_size=command.batch_size,
        progress=command.progress,
    )
    say = functools.partial(print, file=sys.stderr)
    try:
        summary = run(job, say=say)
    except (JobError, MissingExtra, ModelLoadError, OSError) as error:
        say(f"vit-serve batch: {error}")
        return 2
    except ServeError as error:  # an option the model refuses (e.g. --top-k above its classes)
        say(f"vit-serve batch: {error.message}")
        return 2
    say(summary.text())
    return 1 if summary.failed else 0


def verify(command: Verify) -> int:
    """`vit-serve verify`; the exit status: 0 when the bounds are met, 1 when not, 2 when the model cannot load."""
    from app.engine.accuracy_gate import gate_images, table
    from app.engine.loading import ModelLoader
    from app.observability.logs import configure_logging
    from app.runtime.device import set_torch_threads
    from vit_serve_client.predict import CannotStart, find_images

    configure_logging("warning", "text")
    settings = Settings.model_validate({**command.model_dump(exclude={"target", "images"}), "model": [command.target]})
    set_torch_threads(settings.resolved_torch_threads())
    try:
        files = find_images(command.images) if command.images else []  # a wrong path: said before the model loads
        model = ModelLoader(settings)(command.target)
        model.warm_up(gate=False)
        if files:
            images, source = [file.read_bytes() for file in files], "given images"
        else:
            images, source = gate_images(model.calibration, model.gate.images)
        agreement = model.compare(images, source)
    except (ModelLoadError, OSError, CannotStart) as error:
        print(f"vit-serve verify: {error}", file=sys.stderr)
        return 2
    except ServeError as error:  # an image that cannot be read
        print(f"vit-serve verify: {error.message}", file=sys.stderr)
        return 2
    if model.fast_path is None:
        print(
            f"model {command.target!r} runs the exact path (torch fp32, CPU decode): the figures compare it with itself"
        )
    print(table(command.target, agreement, model.gate))
    return 0 if agreement.passed else 1


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
        CliApp.run(
            VitServe,
            cli_args=args,
            cli_settings_source=HandWrittenHelp(VitServe, commands=[Serve, Download, Batch, Verify]),
        )
    except ValidationError as exc:
        sys.exit(f"vit-serve: invalid setting: {describe_validation_error(exc)}")
    except ModelLoadError as exc:
        sys.exit(f"vit-serve: {exc}")


def _stop_before_serving(signum: int, frame: FrameType | None) -> None:
    print("vit-serve: SIGTERM before serving: stopped", file=sys.stderr)
    raise SystemExit(0)


if __name__ == "__main__":
    main()
