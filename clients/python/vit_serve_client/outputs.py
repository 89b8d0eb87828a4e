"""Where `predict` writes: one line per image as it finishes (JSON Lines or CSV), and what an earlier run's output
already holds (for `--resume`)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from vit_serve_client.results import Prediction


@dataclass(frozen=True, slots=True)
class Outcome:
    """One image's line: its classes, or why it failed."""

    path: str
    prediction: Prediction | None = None
    error: str | None = None


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
