"""`vit-serve predict`: classify every image under some paths through a server, with bounded concurrency, a progress
bar, one output line per image written as it goes (so `--resume` can skip what is done), and a summary.

What stops a run before it starts (a path that does not exist, no image files, a server that cannot be reached or
refuses the key, a model it does not serve or that is not ready in time) is one `CannotStart`; a server that is
still warming up is waited for. A request of several images that fails because of
one image (a 4xx naming it) fails that image alone: the others are sent again without it. An unreadable file is a
failed line, never the end of the run; a server that goes away mid-run ends it, leaving the rest for `--resume`.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vit_serve_client.http import AsyncClient
from vit_serve_client.outputs import Outcome, Writer
from vit_serve_client.results import APIError
from vit_serve_client.retry import RetryPolicy
from vit_serve_client.sizing import MAX_CONCURRENCY, Sizing, fit

READY_POLL_S = 1.0  # how often a server that is warming up is asked again
Model = dict[str, Any]  # a model's description, as GET /v1/models gives it
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


class CannotStart(Exception):
    """Why a run could not begin, as one line for a person."""


@dataclass(slots=True)
class Summary:
    images: int = 0
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0  # done in an earlier run (`--resume`)
    not_sent: int = 0  # left when the server went away
    retries: int = 0
    seconds: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    stopped: str | None = None  # why the run ended before every image was sent

    def text(self) -> str:
        counts = f"{self.images} images: {self.succeeded} classified, {self.failed} failed, {self.skipped} skipped"
        counts += f" (done before), {self.not_sent} not sent" if self.not_sent else " (done before)"
        rate = f"{self.seconds:.1f} s, {self.succeeded / self.seconds if self.seconds else 0.0:.1f} images/s"
        if self.latencies_s:
            p50, p99 = (_percentile(self.latencies_s, q) * 1000 for q in (0.5, 0.99))
            latency = f"request latency p50 {p50:.0f} ms, p99 {p99:.0f} ms"
        else:
            latency = "no request answered"
        return f"{counts}; {rate}; {latency}; {self.retries} requests sent again"


@dataclass(frozen=True, slots=True)
class Options:
    url: str
    model: str | None = None
    top_k: int = 5
    batch: int | None = None  # None: fitted to the server (`sizing.fit`)
    concurrency: int | None = None
    api_key: str | None = None
    timeout_s: float = 60.0
    attempts: int = 5
    wait_s: float = 300.0  # for a server that is warming up
    progress: bool = True


def find_images(paths: Sequence[Path]) -> list[Path]:
    """Files named as they are; folders walked (recursively, sorted) for files with an image suffix."""
    missing = [str(path) for path in paths if not path.exists()]
    if missing:
        raise CannotStart(f"no such file or folder: {', '.join(missing)}")
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if _is_image_file(p)))
        else:
            found.append(path)
    if not found:
        raise CannotStart(f"no image files ({' '.join(sorted(IMAGE_SUFFIXES))}) in {', '.join(map(str, paths))}")
    return found


def _is_image_file(path: Path) -> bool:
    """A file (or a link, even a broken one: it is reported as unreadable) with an image suffix."""
    return path.suffix.lower() in IMAGE_SUFFIXES and (path.is_symlink() or path.is_file())


def batches(items: Sequence[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


async def served_model(client: AsyncClient, name: str | None, *, wait_s: float, say: Callable[[str], None]) -> Model:
    """The description of model `name` (None: the server's default) once it is ready, asked before any image is
    sent: a server still warming up (its port open, the model not ready) is waited for, up to `wait_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    info = await _described(client, name)
    if not info.get("ready", True):
        say(f"vit-serve predict: waiting up to {wait_s:g} s for {info['name']} at {client.url} to be ready")
    while not info.get("ready", True):
        if loop.time() >= deadline:
            raise CannotStart(f"{client.url}: model {info['name']!r} was not ready within {wait_s:g} s")
        await asyncio.sleep(min(READY_POLL_S, deadline - loop.time()))
        info = await _described(client, name)
    return info


async def _described(client: AsyncClient, name: str | None) -> Model:
    try:
        listing = await client.models()
    except APIError as error:
        if error.status in (401, 403):
            raise CannotStart(f"{client.url} refused the API key: {error}") from error
        raise CannotStart(f"{client.url}: {error}" if error.status else str(error)) from error
    try:
        wanted = name or listing["default"]
        served = {info["name"]: info for info in listing["models"]}
    except (TypeError, KeyError) as error:
        raise CannotStart(f"{client.url} does not answer GET /v1/models as a vit-serve server does") from error
    if wanted not in served:
        raise CannotStart(f"{client.url} serves no model {wanted!r} (it serves {', '.join(sorted(served))})")
    info: Model = served[wanted]
    return info


async def predict(
    paths: Sequence[Path], writer: Writer, options: Options, *, skip: set[str], say: Callable[[str], None]
) -> Summary:
    """Classify every image of `paths` not in `skip`, writing each outcome as it comes; `say` gets the line that
    tells what the run will do. Raises `CannotStart` before any image is sent."""
    from tqdm import tqdm

    images = find_images(paths)
    todo = [p for p in images if str(p) not in skip]
    summary = Summary(images=len(images), skipped=len(images) - len(todo))
    retry = RetryPolicy(attempts=options.attempts)
    connections = options.concurrency or MAX_CONCURRENCY
    async with AsyncClient(
        options.url, api_key=options.api_key, timeout_s=options.timeout_s, retry=retry, max_connections=connections
    ) as client:
        info = await served_model(client, options.model, wait_s=options.wait_s, say=say)
        sizing = fit(info, batch=options.batch, concurrency=options.concurrency)
        say(_plan(len(todo), summary.skipped, info["name"], client.url, sizing))
        queue: asyncio.Queue[list[Path]] = asyncio.Queue()
        for batch in batches(todo, sizing.batch):
            queue.put_nowait(batch)
        started = time.perf_counter()
        progress = tqdm(total=len(todo), unit="img", file=sys.stderr, disable=not options.progress, dynamic_ncols=True)

        def record(outcome: Outcome) -> None:
            writer.write(outcome)
            summary.succeeded += outcome.error is None
            summary.failed += outcome.error is not None
            progress.update(1)

        async def worker() -> None:
            while not queue.empty() and summary.stopped is None:
                await send(client, queue.get_nowait(), info["name"], options.top_k, record, summary)

        try:
            await asyncio.gather(*(worker() for _ in range(sizing.concurrency)))
        finally:
            progress.close()
        summary.retries = client.retries
    summary.seconds = time.perf_counter() - started
    while not queue.empty():
        summary.not_sent += len(queue.get_nowait())
    return summary


def _plan(todo: int, skipped: int, model: str, url: str, sizing: Sizing) -> str:
    before = f" ({skipped} done before)" if skipped else ""
    return (
        f"vit-serve predict: {todo} images{before} to {model} at {url}: {sizing.batch} a request, "
        f"{sizing.concurrency} requests at once ({sizing.basis})"
    )


async def send(
    client: AsyncClient,
    paths: list[Path],
    model: str,
    top_k: int,
    record: Callable[[Outcome], None],
    summary: Summary,
) -> None:
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
        predictions = await client.classify([data for _, data in readable], model=model, top_k=top_k, logits=False)
    except APIError as error:
        if len(readable) > 1 and error.image_at_fault:
            culprits = [readable[error.index][0]] if error.index is not None else []
            if culprits:
                record(Outcome(str(culprits[0]), error=str(error)))
                await send(client, [p for p, _ in readable if p not in culprits], model, top_k, record, summary)
            else:  # the request as a whole was refused (e.g. too large): each image on its own
                for path, _ in readable:
                    await send(client, [path], model, top_k, record, summary)
            return
        for path, _ in readable:
            record(Outcome(str(path), error=str(error)))
        if error.code == "unreachable":  # every later request would fail the same way
            summary.stopped = str(error)
        return
    summary.latencies_s.append(time.perf_counter() - started)
    for (path, _), prediction in zip(readable, predictions, strict=True):
        record(Outcome(str(path), prediction=prediction))


def _percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]
