"""`vit-serve batch`: every input image through one engine (this process, or a Ray cluster), its rows written as they
come, a progress bar with images/s and ETA, and a summary at the end.

A bad image is a failed row, never the end of the job. What stops a job before it starts (an input that names
nothing, an output that exists without `--resume`, a model that cannot load, a missing extra) is raised before any row
is written.
"""

from __future__ import annotations

import collections
import sys
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc

from app.batch import rows
from app.batch.inputs import find_inputs
from app.batch.outputs import done_before, holds_rows, open_writer
from app.config.settings import Settings
from app.engine.predictor import Outputs

Engine = Literal["local", "ray"]
WORKER_COLUMN = "worker"  # which process classified a row: counted in the summary, never written


class JobError(Exception):
    """Why a job cannot start, as one line for a person."""


@dataclass(frozen=True, slots=True)
class Job:
    inputs: Sequence[str]
    output: Path
    settings: Settings  # the model repository, the device and the rest, as the server reads them
    model: str
    engine: Engine = "local"
    top_k: int | None = None
    logits: bool = False
    embedding: bool = False
    resume: bool = False
    address: str | None = None  # the Ray cluster; None: the one this process joined, else a local one
    concurrency: int = 1  # Ray actors, each with its own copy of the model
    num_gpus: float = 0.0  # per Ray actor
    batch_size: int = 64  # images per Ray batch
    progress: bool = True


@dataclass(slots=True)
class Summary:
    images: int = 0
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0  # classified in an earlier run (`--resume`)
    seconds: float = 0.0  # the whole job, the model's loading and warm-up included
    startup_s: float = 0.0  # until the first rows: loading, warm-up (Ray: the cluster and its actors), a first chunk
    startup_rows: int = 0  # the first rows
    failures: collections.Counter[str] = field(default_factory=collections.Counter)  # by error code
    workers: collections.Counter[str] = field(default_factory=collections.Counter)  # rows by process (Ray)

    @property
    def images_per_s(self) -> float:
        return (self.succeeded + self.failed) / self.seconds if self.seconds else 0.0

    @property
    def steady_images_per_s(self) -> float:
        """Images/s once the first rows came: the rate a longer job approaches."""
        steady_s = self.seconds - self.startup_s
        return (self.succeeded + self.failed - self.startup_rows) / steady_s if steady_s > 0 else 0.0

    def text(self) -> str:
        failed = f"{self.failed} failed"
        if self.failures:
            failed += " (" + ", ".join(f"{code} {n}" for code, n in self.failures.most_common()) + ")"
        line = (
            f"{self.images} images: {self.succeeded} classified, {failed}, {self.skipped} skipped (done before); "
            f"{self.seconds:.1f} s ({self.startup_s:.1f} s to the first rows), {self.images_per_s:.1f} images/s"
        )
        if self.workers:
            line += f"; rows from {len(self.workers)} worker process{'es' if len(self.workers) > 1 else ''}"
        return line


def run(job: Job, *, say: Callable[[str], None] = print) -> Summary:
    """Run `job` to the end; `say` gets the line that tells what it will do. Raises `JobError` before any row."""
    from tqdm import tqdm

    from app.batch.inputs import InputError

    try:
        paths = find_inputs(job.inputs)
    except InputError as error:
        raise JobError(str(error)) from None
    if holds_rows(job.output) and not job.resume:
        raise JobError(f"{job.output} holds rows of an earlier run; add --resume to go on from it, or remove it")
    skip = done_before(job.output) if job.resume else set()
    todo = [path for path in paths if path not in skip]
    summary = Summary(images=len(paths), skipped=len(paths) - len(todo))
    engine = f"Ray ({job.concurrency} actors)" if job.engine == "ray" else "this process"
    before = f" ({summary.skipped} done before)" if summary.skipped else ""
    say(f"vit-serve batch: {len(todo)} images{before} through {job.model} in {engine} -> {job.output}")
    if not todo:
        return summary
    schema = rows.schema(Outputs(top_k=1, logits=job.logits, embedding=job.embedding))
    started = time.perf_counter()
    tables = _tables(job, todo)
    first = next(tables)  # the model loaded and the first rows made: only then is the output written to
    summary.startup_s, summary.startup_rows = time.perf_counter() - started, first.num_rows
    writer = open_writer(job.output, schema)
    progress = tqdm(total=len(todo), unit="img", file=sys.stderr, disable=not job.progress, dynamic_ncols=True)
    try:
        for table in _prepend(first, tables):
            if WORKER_COLUMN in table.column_names:
                summary.workers.update(table.column(WORKER_COLUMN).to_pylist())
                table = table.drop_columns([WORKER_COLUMN])
            writer.write(table)
            _count(summary, table)
            progress.update(table.num_rows)
    finally:
        progress.close()
        writer.close()
        tables.close()  # the engine's resources (its predictor, its threads) released now, also on an error
    summary.seconds = time.perf_counter() - started
    return summary


def _tables(job: Job, todo: Sequence[str]) -> Generator[pa.Table]:
    if job.engine == "ray":
        from app.batch.ray_data import ray_tables

        return ray_tables(
            job.settings,
            job.model,
            todo,
            top_k=job.top_k,
            logits=job.logits,
            embedding=job.embedding,
            address=job.address,
            concurrency=job.concurrency,
            num_gpus=job.num_gpus,
            batch_size=job.batch_size,
            worker_column=WORKER_COLUMN,
        )
    from app.batch.local import local_tables

    return local_tables(job.settings, job.model, todo, top_k=job.top_k, logits=job.logits, embedding=job.embedding)


def _prepend(first: pa.Table, rest: Iterator[pa.Table]) -> Generator[pa.Table]:
    yield first
    yield from rest


def _count(summary: Summary, table: pa.Table) -> None:
    codes = table.column("error_code")
    failed = table.num_rows - pc.sum(pc.is_null(codes)).as_py()
    summary.failed += failed
    summary.succeeded += table.num_rows - failed
    if failed:
        summary.failures.update(code for code in codes.to_pylist() if code is not None)
