"""Where a batch job's rows go: a folder of Parquet files (the default) or a JSON Lines file (`*.jsonl`).

Each run adds to the output: a Parquet folder gets a part file of its own (`part-<UTC time>-<id>.parquet`), a JSON Lines
file more lines. So `--resume` keeps what an earlier run wrote, skips the paths it classified, and adds rows for the
rest; a path tried again has several rows, and its last one is its outcome (`read_rows`).
"""

from __future__ import annotations

import datetime
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from app.batch.rows import Row


class RowWriter(Protocol):
    def write(self, rows: pa.Table) -> None: ...

    def close(self) -> None: ...


def is_jsonl(output: Path) -> bool:
    return output.suffix.lower() == ".jsonl"


def holds_rows(output: Path) -> bool:
    """Whether an earlier run wrote to `output`."""
    return output.is_file() or (output.is_dir() and any(output.glob("*.parquet")))


def open_writer(output: Path, schema: pa.Schema) -> RowWriter:
    if is_jsonl(output):
        output.parent.mkdir(parents=True, exist_ok=True)
        return JsonLinesWriter(output.open("a", encoding="utf-8"))
    if output.exists() and not output.is_dir():
        raise NotADirectoryError(f"{output} is a file: name a folder for Parquet output, or a .jsonl file")
    output.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.UTC)  # part names sort by time: a later run's rows are read later
    return ParquetPartWriter(output / f"part-{started:%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}.parquet", schema)


class ParquetPartWriter:
    """One Parquet file, a row group per `write`; a file with no row is not left behind."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path = path
        self._schema = schema
        self._writer: pq.ParquetWriter | None = None

    def write(self, rows: pa.Table) -> None:
        if rows.num_rows == 0:
            return
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, self._schema)
        self._writer.write_table(rows.cast(self._schema))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> ParquetPartWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class JsonLinesWriter:
    """A JSON object a line, as `vit-serve predict` writes them, flushed after each batch."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def write(self, rows: pa.Table) -> None:
        self._stream.writelines(json.dumps(r) + "\n" for r in rows.to_pylist())
        self._stream.flush()

    def close(self) -> None:
        self._stream.close()


def iter_rows(output: Path) -> Iterator[Row]:
    """Every row an output holds, in the order written (part files by name: by time)."""
    if not output.exists():
        return
    if is_jsonl(output):
        with output.open(encoding="utf-8") as stream:
            for line in stream:
                try:
                    yield json.loads(line)
                except ValueError:  # a line cut short when an earlier run was stopped
                    continue
        return
    for part in sorted(output.glob("*.parquet")):
        yield from pq.read_table(part).to_pylist()


def read_rows(output: Path) -> dict[str, Row]:
    """Each path's outcome: its last row."""
    return {r["path"]: r for r in iter_rows(output)}


def done_before(output: Path) -> set[str]:
    """Paths an earlier run classified (failed ones are tried again)."""
    return {path for path, r in read_rows(output).items() if not r.get("error")}
