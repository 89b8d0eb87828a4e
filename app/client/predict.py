"""`vit-serve predict`: classify every image under some paths through a server, with bounded concurrency, a progress
bar, one output line per image written as it goes (so `--resume` can skip what is done), and a summary.

A request of several images that fails because of one image (a 4xx naming it) fails that image alone: the others are
sent again without it. An unreadable file is a failed line, never the end of the run.
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from app.client.http import AsyncClient
from app.client.results import APIError, Prediction
from app.client.retry import RetryPolicy

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


@dataclass(frozen=True, slots=True)
class Outcome:
    """One image's line: its classes, or why it failed."""

    path: str
    prediction: Prediction | None = None
    error: str | None = None


@dataclass(slots=True)
class Summary:
    images: int = 0
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0  # done in an earlier run (`--resume`)
    retries: int = 0
    seconds: float = 0.0
    latencies_s: list[float] = field(default_factory=list)

    def text(self) -> str:
        rate = self.succeeded / self.seconds if self.seconds else 0.0
        p50, p99 = (_percentile(self.latencies_s, q) * 1000 for q in (0.5, 0.99))
        return (
            f"{self.images} images: {self.succeeded} classified, {self.failed} failed, {self.skipped} skipped (done "
            f"before); {self.seconds:.1f} s, {rate:.1f} images/s; request latency p50 {p50:.0f} ms, p99 {p99:.0f} ms; "
            f"{self.retries} requests sent again"
        )


def find_images(paths: Sequence[Path]) -> list[Path]:
    """Files named as they are; folders walked (recursively, sorted) for files with an image suffix."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if _is_image_file(p)))
        else:
            found.append(path)  # missing or unreadable: reported as a failed line
    return found


def _is_image_file(path: Path) -> bool:
    """A file (or a link, even a broken one: it is reported as unreadable) with an image suffix."""
    return path.suffix.lower() in IMAGE_SUFFIXES and (path.is_symlink() or path.is_file())


class Writer(Protocol):
    def write(self, outcome: Outcome) -> None: ...


class JsonLinesWriter:
    """`{"path": ..., "top_k": [{"index", "label", "score"}, ...], "error": null}` a line."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def write(self, outcome: Outcome) -> None:
        top_k = [vars_of(score) for score in outcome.prediction.top_k] if outcome.prediction else None
        self._stream.write(json.dumps({"path": outcome.path, "top_k": top_k, "error": outcome.error}) + "\n")
        self._stream.flush()


class CsvWriter:
    """Columns: path, label and score of the best class, top_k (JSON), error."""

    HEADER = ("path", "label", "score", "top_k", "error")

    def __init__(self, stream: IO[str], *, header: bool) -> None:
        self._stream = stream
        self._csv = csv.writer(stream)
        if header:
            self._csv.writerow(self.HEADER)

    def write(self, outcome: Outcome) -> None:
        scores = outcome.prediction.top_k if outcome.prediction else []
        best = scores[0] if scores else None
        self._csv.writerow(
            [
                outcome.path,
                best.label if best else "",
                f"{best.score:.6g}" if best else "",
                json.dumps([vars_of(s) for s in scores]) if scores else "",
                outcome.error or "",
            ]
        )
        self._stream.flush()


def vars_of(score: Any) -> dict[str, Any]:
    return {"index": score.index, "label": score.label, "score": score.score}


def done_before(output: Path) -> set[str]:
    """Paths an earlier run wrote without an error (failed ones are tried again)."""
    if not output.exists():
        return set()
    with output.open(newline="", encoding="utf-8") as stream:
        if output.suffix == ".csv":
            return {row["path"] for row in csv.DictReader(stream) if not row.get("error")}
        done = set()
        for line in stream:
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short when the earlier run was stopped
                continue
            if not record.get("error"):
                done.add(record["path"])
        return done


def batches(items: Sequence[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


@dataclass(frozen=True, slots=True)
class Options:
    url: str
    model: str | None = None
    top_k: int = 5
    concurrency: int = 4
    batch: int = 8
    api_key: str | None = None
    timeout_s: float = 60.0
    attempts: int = 5
    progress: bool = True


async def predict(paths: Sequence[Path], writer: Writer, options: Options, *, skip: set[str]) -> Summary:
    """Classify every image of `paths` not in `skip`, writing each outcome as it comes."""
    from tqdm import tqdm

    images = find_images(paths)
    todo = [p for p in images if str(p) not in skip]
    summary = Summary(images=len(images), skipped=len(images) - len(todo))
    queue: asyncio.Queue[list[Path]] = asyncio.Queue()
    for batch in batches(todo, options.batch):
        queue.put_nowait(batch)
    started = time.perf_counter()
    progress = tqdm(total=len(todo), unit="img", file=sys.stderr, disable=not options.progress, dynamic_ncols=True)

    def record(outcome: Outcome) -> None:
        writer.write(outcome)
        summary.succeeded += outcome.error is None
        summary.failed += outcome.error is not None
        progress.update(1)

    retry = RetryPolicy(attempts=options.attempts)
    async with AsyncClient(
        options.url,
        api_key=options.api_key,
        timeout_s=options.timeout_s,
        retry=retry,
        max_connections=options.concurrency,
    ) as client:

        async def worker() -> None:
            while not queue.empty():
                await send(client, queue.get_nowait(), options, record, summary)

        await asyncio.gather(*(worker() for _ in range(options.concurrency)))
        summary.retries = client.retries
    progress.close()
    summary.seconds = time.perf_counter() - started
    return summary


async def send(client: AsyncClient, paths: list[Path], options: Options, record: Any, summary: Summary) -> None:
    """One request for `paths`; on a failure that one image caused, that image fails and the rest go again."""
    readable: list[tuple[Path, bytes]] = []
    for path in paths:
        try:
            readable.append((path, path.read_bytes()))
        except OSError as exc:
            record(Outcome(str(path), error=f"unreadable: {exc.strerror or exc}"))
    if not readable:
        return
    started = time.perf_counter()
    try:
        predictions = await client.classify(
            [data for _, data in readable], model=options.model, top_k=options.top_k, logits=False
        )
    except APIError as error:
        if len(readable) > 1 and error.image_at_fault:
            culprits = [readable[error.index][0]] if error.index is not None else []
            if culprits:
                record(Outcome(str(culprits[0]), error=str(error)))
                await send(client, [p for p, _ in readable if p not in culprits], options, record, summary)
            else:  # the request as a whole was refused (e.g. too large): each image on its own
                for path, _ in readable:
                    await send(client, [path], options, record, summary)
            return
        for path, _ in readable:
            record(Outcome(str(path), error=str(error)))
        return
    summary.latencies_s.append(time.perf_counter() - started)
    for (path, _), prediction in zip(readable, predictions, strict=True):
        record(Outcome(str(path), prediction=prediction))


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]
